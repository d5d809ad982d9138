"""Each model's health over the last five minutes, as this instance saw it (GET /api/admin/models).

`ModelHealth` is a `ChainObserver` (providers/base.py) that passes every report on to the one it
wraps (the metrics, or the tracing observer around them) and keeps, per model, the last five
minutes of what its chains reported: each upstream attempt's outcome, each first token's wait, each
reply a fallback served. A handful of appends per reply, nothing per chunk; entries older than the
window are dropped as new ones arrive (and skipped when read), and each model keeps at most
`MAX_EVENTS` of each kind.

What counts: an attempt that reached the provider (a link skipped for an open circuit is not a
request) and was not abandoned by its client; every outcome but `ok` is an error.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, TypeVar

if TYPE_CHECKING:
    from gateway.config import ModelConfig
    from gateway.store.usage import UsageRecord

WINDOW_S = 300.0
MAX_EVENTS = 10_000  # per model and kind: a busy model's window is a sample of its last 10,000
NOT_REQUESTS = frozenset({"cancelled", "circuit_open", "cooldown"})
T = TypeVar("T")


class Reported(Protocol):
    """What this wraps: a `ChainObserver` (providers/base.py; named here by shape, as observability
    imports nothing above it)."""

    def upstream_call(self, overhead_s: float) -> None: ...

    def attempt_answered(self, model: ModelConfig, seconds: float, planned: ModelConfig) -> None: ...

    def attempt_ended(self, model: ModelConfig, outcome: str) -> None: ...

    def reply_streamed(self, model: ModelConfig, batches: int, seconds: float) -> None: ...

    def usage(self, record: UsageRecord) -> None: ...


def percentile(values: list[float], p: float) -> float | None:
    """The nearest-rank percentile `p` (0..1) of `values`, None for none."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p * len(ordered)) - 1)]


class ModelHealth:
    """A `ChainObserver` passing everything to `inner`, keeping each model's last five minutes."""

    def __init__(self, inner: Reported, clock: Callable[[], float] = time.monotonic,
                 window_s: float = WINDOW_S) -> None:
        self.inner = inner
        self.window_s = window_s
        self._clock = clock
        self._attempts: dict[str, deque[tuple[float, bool]]] = {}  # (when, ok)
        self._first_tokens: dict[str, deque[tuple[float, float]]] = {}  # (when, seconds)
        self._fallbacks: dict[str, deque[tuple[float, str]]] = {}  # by the planned model: (when, who answered)

    # -- ChainObserver --

    def upstream_call(self, overhead_s: float) -> None:
        self.inner.upstream_call(overhead_s)

    def attempt_answered(self, model: ModelConfig, seconds: float, planned: ModelConfig) -> None:
        self.inner.attempt_answered(model, seconds, planned)
        now = self._clock()
        _add(self._first_tokens, model.name, (now, seconds), self.window_s)
        if model.name != planned.name:
            _add(self._fallbacks, planned.name, (now, model.name), self.window_s)

    def attempt_ended(self, model: ModelConfig, outcome: str) -> None:
        self.inner.attempt_ended(model, outcome)
        if outcome not in NOT_REQUESTS:
            _add(self._attempts, model.name, (self._clock(), outcome == "ok"), self.window_s)

    def reply_streamed(self, model: ModelConfig, batches: int, seconds: float) -> None:
        self.inner.reply_streamed(model, batches, seconds)

    def usage(self, record: UsageRecord) -> None:
        self.inner.usage(record)

    # -- read back --

    def window(self, model: str) -> dict[str, float | int | None]:
        """The model's last five minutes: requests, errors, error rate, first token p50/p95 (ms), fallbacks."""
        since = self._clock() - self.window_s
        attempts = [ok for when, ok in self._attempts.get(model, ()) if when >= since]
        waits = [seconds for when, seconds in self._first_tokens.get(model, ()) if when >= since]
        errors = attempts.count(False)
        p50, p95 = percentile(waits, 0.5), percentile(waits, 0.95)
        return {"requests": len(attempts), "errors": errors,
                "error_rate": round(errors / len(attempts), 4) if attempts else None,
                "ttft_p50_ms": round(p50 * 1000, 1) if p50 is not None else None,
                "ttft_p95_ms": round(p95 * 1000, 1) if p95 is not None else None,
                "fallbacks": sum(1 for when, _ in self._fallbacks.get(model, ()) if when >= since)}


def _add(events: dict[str, deque[tuple[float, T]]], model: str, event: tuple[float, T], window_s: float) -> None:
    found = events.get(model)
    if found is None:
        found = events[model] = deque(maxlen=MAX_EVENTS)
    found.append(event)
    since = event[0] - window_s
    while found[0][0] < since:  # the newest is never older than itself: the loop stops
        found.popleft()
