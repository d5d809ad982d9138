"""Circuit breakers, one per model: stop sending traffic to a model that keeps failing.

closed --N consecutive failures--> open --cool-down passed--> half-open (one probe allowed)
half-open --probe succeeds--> closed;  half-open --probe fails--> open again

The state is in-process (each instance learns on its own) and readable by other features:
random draws skip models whose circuit is open.

Besides the circuit, a name may be put in a short cooldown (`cool`): one of several deployments
of a model that answered 429 or 5xx is skipped for a few seconds while its siblings serve.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from gateway.vocabulary import CircuitState


@dataclass(slots=True)
class _State:
    failures: int = 0
    opened_at: float | None = None
    probing: bool = False


class CircuitBreakers:
    def __init__(self, failure_threshold: int = 5, cooldown_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.failure_threshold = failure_threshold
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._states: dict[str, _State] = {}
        self._cool_until: dict[str, float] = {}

    def state(self, model: str) -> CircuitState:
        """Closed, open, or half-open (open, but the cool-down has passed: a probe may go)."""
        s = self._states.get(model)
        if s is None or s.opened_at is None:
            return CircuitState.CLOSED
        if self._clock() - s.opened_at >= self.cooldown_s:
            return CircuitState.HALF_OPEN
        return CircuitState.OPEN

    def available(self, model: str) -> bool:
        """Whether a request to this model could be let through now (without claiming the probe)."""
        s = self._states.get(model)
        if self.cooling(model):
            return False
        state = self.state(model)
        return state is CircuitState.CLOSED or (state is CircuitState.HALF_OPEN and not (s and s.probing))

    def cooling(self, model: str) -> bool:
        until = self._cool_until.get(model)
        if until is None:
            return False
        if self._clock() < until:
            return True
        del self._cool_until[model]
        return False

    def cool(self, model: str, seconds: float) -> None:
        """Skip `model` for `seconds` (extending, never shortening, a cooldown already running)."""
        until = self._clock() + seconds
        self._cool_until[model] = max(until, self._cool_until.get(model, until))

    def allow(self, model: str) -> bool:
        """Claim a request slot: always when closed (and not cooling); the single probe when half-open."""
        if self.cooling(model):
            return False
        state = self.state(model)
        if state is CircuitState.CLOSED:
            return True
        if state is CircuitState.OPEN:
            return False
        s = self._states[model]
        if s.probing:
            return False
        s.probing = True
        return True

    def success(self, model: str) -> None:
        self._states.pop(model, None)

    def failure(self, model: str) -> None:
        s = self._states.setdefault(model, _State())
        s.failures += 1
        if s.probing or s.failures >= self.failure_threshold:
            s.opened_at = self._clock()
            s.probing = False

    def release(self, model: str) -> None:
        """A claimed probe that ended neither way (cancelled): let the next request probe."""
        s = self._states.get(model)
        if s is not None:
            s.probing = False
