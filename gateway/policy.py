"""Decide, part two: the operator's rules. One decision per request: approve, downgrade, or refuse.

Checks, in order: models allowed for the key (403), the max_tokens ceiling (downgrade: clamp),
concurrent streams per user (429, in-process), then one database call (`gateway_admit_chain`, see
sql/0008_key_tree.sql, after sql/0003_policy.sql and sql/0007_admit_codes.sql; its SQL is in
store/limits.py) for requests per minute per user and per key and the daily token caps; its
refusal names the limit that fired. A key's limits are those of the key and of every ancestor
in its tree (api/keys.py): a child's request takes a slot in each ancestor's window and reserves
against each ancestor's daily cap, so a parent's budget is shared by its subtree.
A daily cap reserves the request's worst case (prompt estimate + max_tokens, clamped to what
remains today) atomically; the finish write settles it to the real usage, and a request that
never runs releases it. Nearly out of budget, a request may be downgraded to a cheaper model.

Chat turns split this in two (turns.py): `take_rate`, the abuse limit, runs at the edge before
anything is written (a 429 there persists nothing); `admit(..., rate_taken=True)` runs after the
user message is committed, and its refusal is saved as a `refused` reply. The stateless routes
call `admit` alone, which does both in one call. With no limits configured, the policy does no
I/O at all.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from functools import partial
from typing import Any

import asyncpg

from .auth import Principal
from .config import LimitsConfig
from .errors import Forbidden, TooManyRequests
from .store import limits as store
from .store.limits import LimitReached
from .vocabulary import PolicyAction

log = logging.getLogger(__name__)

# worst case assumed for a reply whose request names no max_tokens and no ceiling applies
DEFAULT_RESERVE_TOKENS = 1024


@dataclass(slots=True, kw_only=True)
class Admission:
    """What the policy granted one request, carried to its finish.

    `on_done` gives back the request's concurrency slot; `done()` calls it at most once.
    """

    action: PolicyAction
    model: str
    max_tokens: int | None
    day: date
    user_reserved: int = 0
    key_reserved: int = 0
    downgraded_from: str | None = None
    reasons: list[str] = field(default_factory=list)
    on_done: Callable[[], None] | None = field(default=None, repr=False, compare=False)

    def done(self) -> None:
        """Give back the concurrency slot (idempotent)."""
        on_done, self.on_done = self.on_done, None
        if on_done is not None:
            on_done()


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """The limits that apply to one caller: the user's from config, the key's and its ancestors'
    from their rows."""

    user_rpm: int | None
    key_rpm: int | None  # the key's own (the chain's are in key_chain)
    user_daily: int | None
    key_daily: int | None
    max_concurrent: int | None
    max_tokens: int | None
    models: frozenset[str] | None
    # the key, then each ancestor, that has a requests-per-minute or daily-token limit
    key_chain: tuple[store.KeyCap, ...] = ()


@dataclass(slots=True, kw_only=True)
class _Reservation:
    """What the database granted: tokens reserved per cap, and the reply's bound if it had to shrink."""

    user: int = 0
    key: int = 0
    clamped_to: int | None = None  # tokens granted, when fewer than the worst case


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def limits_for(config: LimitsConfig, principal: Principal) -> Limits:
    key = principal.limits or {}
    chain: list[tuple[uuid.UUID, dict[str, Any]]] = []
    if principal.api_key_id is not None:
        chain = [(principal.api_key_id, key), *((a.id, a.limits or {}) for a in principal.ancestors)]
    ceilings = [c for c in (config.max_tokens, *(_int_or_none(k.get("max_tokens")) for _, k in chain)) if c]
    concurrency = [c for c in (config.max_concurrent_streams,
                               *(_int_or_none(k.get("max_concurrent_streams")) for _, k in chain)) if c]
    models: frozenset[str] | None = None
    for _, k in chain:  # every key of the chain that names models narrows the set
        if isinstance(k.get("models"), list):
            models = frozenset(k["models"]) if models is None else models & frozenset(k["models"])
    caps = (store.KeyCap(key_id=i, rpm=_int_or_none(k.get("requests_per_minute")),
                         daily=_int_or_none(k.get("daily_tokens"))) for i, k in chain)
    return Limits(user_rpm=config.requests_per_minute, key_rpm=_int_or_none(key.get("requests_per_minute")),
                  user_daily=config.daily_tokens, key_daily=_int_or_none(key.get("daily_tokens")),
                  max_concurrent=min(concurrency) if concurrency else None,
                  max_tokens=min(ceilings) if ceilings else None, models=models,
                  key_chain=tuple(c for c in caps if c.rpm is not None or c.daily is not None))


def utc_now() -> datetime:
    return datetime.now(UTC)


def _next_midnight(day: date) -> datetime:
    return datetime.combine(day + timedelta(days=1), datetime.min.time(), UTC)


class Policy:
    def __init__(self, config: LimitsConfig, pool: asyncpg.Pool, clock: Callable[[], datetime] = utc_now) -> None:
        self._config = config
        self._pool = pool
        self.clock = clock  # injectable: tests pin it to step minutes
        self._streams: dict[uuid.UUID, int] = {}

    def active_streams(self, user_id: uuid.UUID) -> int:
        return self._streams.get(user_id, 0)

    async def take_rate(self, principal: Principal) -> None:
        """The abuse limit, at the edge: a slot in the user's and each key's per-minute window, or
        TooManyRequests. Reserves nothing; `admit(..., rate_taken=True)` must follow."""
        limits = limits_for(self._config, principal)
        keys = tuple(replace(k, daily=None) for k in limits.key_chain if k.rpm is not None)
        if limits.user_rpm is None and not keys:
            return
        now = self.clock()
        await self._admit_in_database(principal, replace(limits, user_daily=None, key_chain=keys), now.date(),
                                      None, 0, now, 1)

    async def admit(self, principal: Principal, model: str, prompt_tokens: int, max_tokens: int | None,
                    downgrade_to: str | None = None, share: int = 1, rate_taken: bool = False) -> Admission:
        """`share`: this request is admitted together with share - 1 others (the arena's slots),
        so a daily reservation takes at most 1/share of what remains. `rate_taken`: `take_rate`
        already counted this request."""
        limits = limits_for(self._config, principal)
        if rate_taken:
            limits = replace(limits, user_rpm=None, key_rpm=None,
                             key_chain=tuple(replace(k, rpm=None) for k in limits.key_chain if k.daily is not None))
        now = self.clock()
        day = now.date()
        action, reasons = PolicyAction.APPROVE, []
        if limits.models is not None and model not in limits.models:
            raise Forbidden(f"this key may not use model {model!r}")
        ceiling = max_tokens
        if limits.max_tokens is not None and (max_tokens is None or max_tokens > limits.max_tokens):
            ceiling = limits.max_tokens
            if max_tokens is not None:
                action = PolicyAction.DOWNGRADE
                reasons.append(f"max_tokens clamped to {limits.max_tokens}")
        if limits.max_concurrent is not None and self.active_streams(principal.user_id) >= limits.max_concurrent:
            raise TooManyRequests(f"at most {limits.max_concurrent} concurrent streams", retry_after=1,
                                  reason="concurrent_streams")
        reserved, downgraded_from = _Reservation(), None
        if limits.user_rpm is not None or limits.user_daily is not None or limits.key_chain:
            reserved = await self._admit_in_database(principal, limits, day, ceiling, prompt_tokens, now, share)
            if reserved.clamped_to is not None:
                # what remains today bounds the reply: the upstream is told so, and the cap holds
                ceiling = reserved.clamped_to - prompt_tokens
                action = PolicyAction.DOWNGRADE
                reasons.append(f"max_tokens clamped to the {reserved.clamped_to} tokens left today")
            if (downgrade_to and downgrade_to != model and limits.user_daily is not None
                    and await self._nearly_spent(principal.user_id, day, reserved.user, limits.user_daily)):
                action, downgraded_from, model = PolicyAction.DOWNGRADE, model, downgrade_to
                reasons.append("daily budget nearly spent")
        self._streams[principal.user_id] = self.active_streams(principal.user_id) + 1
        return Admission(action=action, model=model, max_tokens=ceiling, day=day, user_reserved=reserved.user,
                         key_reserved=reserved.key, downgraded_from=downgraded_from, reasons=reasons,
                         on_done=partial(self._leave, principal.user_id))

    def _leave(self, user_id: uuid.UUID) -> None:
        n = self._streams.get(user_id, 0) - 1
        if n > 0:
            self._streams[user_id] = n
        else:
            self._streams.pop(user_id, None)

    async def _admit_in_database(self, principal: Principal, limits: Limits, day: date, max_tokens: int | None,
                                 prompt_tokens: int, now: datetime, share: int) -> _Reservation:
        keys_capped = any(k.daily is not None for k in limits.key_chain)
        capped = limits.user_daily is not None or keys_capped
        want = prompt_tokens + (max_tokens or DEFAULT_RESERVE_TOKENS)
        window = now.replace(second=0, microsecond=0)
        try:
            granted = await store.admit(
                self._pool, user_id=principal.user_id, keys=limits.key_chain, day=day, window=window,
                user_rpm=limits.user_rpm, want=want, user_cap=limits.user_daily, share=share)
        except LimitReached as e:
            name = e.limit.value.replace("_", " ")
            if e.limit.per_minute:
                reset = window + timedelta(minutes=1)
                raise TooManyRequests(f"rate limit: {name}",
                                      retry_after=max(1, int((reset - now).total_seconds()) + 1),
                                      reset_at=reset, reason="requests_per_minute") from None
            reset = _next_midnight(day)
            raise TooManyRequests(f"daily token cap reached ({name})",
                                  retry_after=int((reset - now).total_seconds()) + 1, reset_at=reset,
                                  reason="daily_tokens") from None
        if not capped:
            return _Reservation()
        # every capped key of the chain holds the same reservation: settlement and release find them
        reserved = _Reservation(user=granted if limits.user_daily is not None else 0,
                                key=granted if keys_capped else 0)
        if granted < want:
            if granted <= prompt_tokens:
                # not even the prompt fits in what remains: nothing to run
                await store.release(self._pool, user_id=principal.user_id, api_key_id=principal.api_key_id,
                                    day=day, user_tokens=reserved.user, key_tokens=reserved.key)
                reset = _next_midnight(day)
                raise TooManyRequests("daily token cap reached (too little left for this prompt)",
                                      retry_after=int((reset - now).total_seconds()) + 1, reset_at=reset,
                                      reason="daily_tokens")
            reserved.clamped_to = granted
        return reserved

    async def _nearly_spent(self, user_id: uuid.UUID, day: date, reserved: int, cap: int) -> bool:
        """Whether the day's use before this request (spent + others' reservations) passed the mark."""
        threshold = self._config.downgrade_at
        if threshold is None:
            return False
        return await store.user_day_committed(self._pool, user_id, day) - reserved >= threshold * cap

    async def release(self, admission: Admission, user_id: uuid.UUID, api_key_id: uuid.UUID | None) -> None:
        """A request admitted but never run (a duplicate, a vanished thread): give back its
        concurrency slot and hand its reservation back (the user's, its key's and every capped
        ancestor's)."""
        admission.done()
        await store.release(self._pool, user_id=user_id, api_key_id=api_key_id, day=admission.day,
                            user_tokens=admission.user_reserved, key_tokens=admission.key_reserved)
        admission.user_reserved = admission.key_reserved = 0
