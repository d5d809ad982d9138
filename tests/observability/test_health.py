"""A model's last five minutes: counted from what the chain reports, passed on untouched, forgotten on time."""

from __future__ import annotations

from typing import Any

from gateway.config import ModelConfig
from gateway.observability.health import ModelHealth, percentile
from gateway.providers.base import NO_OBSERVER
from tests.support.common import FakeClock

ALPHA = ModelConfig("alpha", "p", "a")
BETA = ModelConfig("beta", "p", "b")


class Told:
    """An observer that writes down what is passed on to it."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def upstream_call(self, overhead_s: float) -> None:
        self.calls.append(("upstream_call", overhead_s))

    def attempt_answered(self, model: ModelConfig, seconds: float, planned: ModelConfig) -> None:
        self.calls.append(("attempt_answered", model.name, seconds, planned.name))

    def attempt_ended(self, model: ModelConfig, outcome: str) -> None:
        self.calls.append(("attempt_ended", model.name, outcome))

    def reply_streamed(self, model: ModelConfig, batches: int, seconds: float) -> None:
        self.calls.append(("reply_streamed", model.name, batches))

    def usage(self, record: Any) -> None:
        self.calls.append(("usage", record))


def test_percentiles_are_nearest_rank():
    assert percentile([], 0.5) is None
    assert percentile([0.3, 0.1, 0.2], 0.5) == 0.2
    assert percentile([float(i) for i in range(1, 101)], 0.95) == 95.0
    assert percentile([0.1, 0.2], 0.95) == 0.2


def test_the_window_counts_requests_errors_first_tokens_and_fallbacks_and_forgets_after_five_minutes():
    clock = FakeClock(1000.0)
    health = ModelHealth(NO_OBSERVER, clock=clock)
    health.attempt_ended(ALPHA, "upstream_http_error")
    health.attempt_answered(BETA, 0.25, ALPHA)  # beta answered for alpha: a fallback taken from alpha
    health.attempt_ended(BETA, "ok")
    health.attempt_ended(ALPHA, "circuit_open")  # never sent: not a request
    health.attempt_ended(BETA, "cancelled")  # its client left: not the model's doing
    clock.now += 200
    health.attempt_answered(ALPHA, 0.5, ALPHA)
    health.attempt_ended(ALPHA, "ok")
    health.attempt_answered(ALPHA, 0.1, ALPHA)
    health.attempt_ended(ALPHA, "ok")
    assert health.window("alpha") == {"requests": 3, "errors": 1, "error_rate": 0.3333, "ttft_p50_ms": 100.0,
                                      "ttft_p95_ms": 500.0, "fallbacks": 1}
    assert health.window("beta") == {"requests": 1, "errors": 0, "error_rate": 0.0, "ttft_p50_ms": 250.0,
                                     "ttft_p95_ms": 250.0, "fallbacks": 0}
    clock.now += 101  # the first minute's reports are now older than five minutes
    assert health.window("alpha") == {"requests": 2, "errors": 0, "error_rate": 0.0, "ttft_p50_ms": 100.0,
                                      "ttft_p95_ms": 500.0, "fallbacks": 0}
    assert health.window("beta") == {"requests": 0, "errors": 0, "error_rate": None, "ttft_p50_ms": None,
                                     "ttft_p95_ms": None, "fallbacks": 0}
    assert health.window("nobody")["requests"] == 0


def test_every_report_is_passed_on_to_the_observer_it_wraps():
    told = Told()
    health = ModelHealth(told, clock=FakeClock(0.0))
    health.upstream_call(0.001)
    health.attempt_answered(ALPHA, 0.2, BETA)
    health.attempt_ended(ALPHA, "ok")
    health.reply_streamed(ALPHA, 3, 0.5)
    health.usage("record")  # type: ignore[arg-type]
    assert told.calls == [("upstream_call", 0.001), ("attempt_answered", "alpha", 0.2, "beta"),
                          ("attempt_ended", "alpha", "ok"), ("reply_streamed", "alpha", 3), ("usage", "record")]
