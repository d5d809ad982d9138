"""Decide, part two: the operator's rules. One decision per request: approve, downgrade, or refuse.

Checks, in order: models allowed for the key (403), the max_tokens ceiling (downgrade: clamp),
concurrent streams per user (429, in-process), then one database call (`gateway_admit`, see
sql/0003_policy.sql) for requests per minute per user and per key and the daily token caps.
A daily cap reserves the request's worst case (prompt estimate + max_tokens, clamped to what
remains today) atomically; the finish write settles it to the real usage, and a request that
never runs releases it. Nearly out of budget, a request may be downgraded to a cheaper model.

A refusal raises before anything is persisted, so the client can retry the same
client_message_id later. With no limits configured, the policy does no I/O at all.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from typing import Any, Callable

import asyncpg

from .auth import Principal
from .config import LimitsConfig
from .errors import Forbidden, TooManyRequests

log = logging.getLogger(__name__)

# worst case assumed for a reply whose request names no max_tokens and no ceiling applies
DEFAULT_RESERVE_TOKENS = 1024


@dataclass(slots=True)
class Admission:
    """What the policy granted one request, carried to its finish."""

    action: str  # approve | downgrade
    model: str
    max_tokens: int | None
    day: date
    user_reserved: int = 0
    key_reserved: int = 0
    downgraded_from: str | None = None
    reasons: list[str] = field(default_factory=list)
    _release: Callable[[], None] | None = None

    def done(self) -> None:
        """Give back the concurrency slot (idempotent)."""
        if self._release is not None:
            self._release()
            self._release = None


@dataclass(frozen=True, slots=True)
class Limits:
    """The limits that apply to one caller: the user's from config, the key's from its row."""

    user_rpm: int | None
    key_rpm: int | None
    user_daily: int | None
    key_daily: int | None
    max_concurrent: int | None
    max_tokens: int | None
    models: frozenset[str] | None


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def limits_for(config: LimitsConfig, principal: Principal) -> Limits:
    key = principal.limits or {}
    ceilings = [c for c in (config.max_tokens, _int_or_none(key.get("max_tokens"))) if c]
    concurrency = [c for c in (config.max_concurrent_streams, _int_or_none(key.get("max_concurrent_streams"))) if c]
    models = key.get("models")
    return Limits(config.requests_per_minute, _int_or_none(key.get("requests_per_minute")), config.daily_tokens,
                  _int_or_none(key.get("daily_tokens")), min(concurrency) if concurrency else None,
                  min(ceilings) if ceilings else None,
                  frozenset(models) if isinstance(models, list) else None)


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


class Policy:
    def __init__(self, config: LimitsConfig, pool: asyncpg.Pool, clock: Callable[[], datetime] = utc_now) -> None:
        self._config = config
        self._pool = pool
        self._clock = clock
        self._streams: dict[uuid.UUID, int] = {}

    def active_streams(self, user_id: uuid.UUID) -> int:
        return self._streams.get(user_id, 0)

    async def admit(self, principal: Principal, model: str, prompt_tokens: int, max_tokens: int | None,
                    downgrade_to: str | None = None, share: int = 1) -> Admission:
        """`share`: this request is admitted together with share - 1 others (the arena's slots),
        so a daily reservation takes at most 1/share of what remains."""
        limits = limits_for(self._config, principal)
        now = self._clock()
        admission = Admission("approve", model, max_tokens, now.date())
        if limits.models is not None and model not in limits.models:
            raise Forbidden(f"this key may not use model {model!r}")
        if limits.max_tokens is not None and (max_tokens is None or max_tokens > limits.max_tokens):
            admission.max_tokens = limits.max_tokens
            if max_tokens is not None:
                admission.action = "downgrade"
                admission.reasons.append(f"max_tokens clamped to {limits.max_tokens}")
        if limits.max_concurrent is not None and self.active_streams(principal.user_id) >= limits.max_concurrent:
            raise TooManyRequests(f"at most {limits.max_concurrent} concurrent streams", retry_after=1)
        if any(x is not None for x in (limits.user_rpm, limits.key_rpm, limits.user_daily, limits.key_daily)):
            await self._admit_in_database(principal, limits, admission, prompt_tokens, now, share)
            if (downgrade_to and downgrade_to != model and limits.user_daily is not None
                    and await self._nearly_spent(principal.user_id, admission, limits.user_daily)):
                admission.action, admission.downgraded_from, admission.model = "downgrade", model, downgrade_to
                admission.reasons.append("daily budget nearly spent")
        self._streams[principal.user_id] = self.active_streams(principal.user_id) + 1
        admission._release = lambda: self._leave(principal.user_id)
        return admission

    def _leave(self, user_id: uuid.UUID) -> None:
        n = self._streams.get(user_id, 0) - 1
        if n > 0:
            self._streams[user_id] = n
        else:
            self._streams.pop(user_id, None)

    async def _admit_in_database(self, principal: Principal, limits: Limits, admission: Admission,
                                 prompt_tokens: int, now: datetime, share: int) -> None:
        capped = limits.user_daily is not None or (limits.key_daily is not None and principal.api_key_id)
        want = prompt_tokens + (admission.max_tokens or DEFAULT_RESERVE_TOKENS)
        window = now.replace(second=0, microsecond=0)
        try:
            granted = await self._pool.fetchval(
                "SELECT gateway_admit($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)", principal.user_id,
                principal.api_key_id, admission.day, window, limits.user_rpm, limits.key_rpm, want,
                limits.user_daily, limits.key_daily, share)
        except asyncpg.PostgresError as e:
            if getattr(e, "sqlstate", None) != "GW429":
                raise
            which = str(e)
            if which.endswith("per_minute"):
                reset = window + timedelta(minutes=1)
                raise TooManyRequests(f"rate limit: {which.replace('_', ' ')}",
                                      retry_after=max(1, int((reset - now).total_seconds()) + 1),
                                      reset_at=reset) from None
            reset = datetime.combine(admission.day + timedelta(days=1), datetime.min.time(), timezone.utc)
            raise TooManyRequests(f"daily token cap reached ({which.replace('_', ' ')})",
                                  retry_after=int((reset - now).total_seconds()) + 1, reset_at=reset) from None
        if not capped:
            return
        if limits.user_daily is not None:
            admission.user_reserved = granted
        if limits.key_daily is not None and principal.api_key_id is not None:
            admission.key_reserved = granted
        if granted < want:
            if granted <= prompt_tokens:
                # not even the prompt fits in what remains: nothing to run
                await self.release(admission, principal.user_id, principal.api_key_id)
                reset = datetime.combine(admission.day + timedelta(days=1), datetime.min.time(), timezone.utc)
                raise TooManyRequests("daily token cap reached (too little left for this prompt)",
                                      retry_after=int((reset - now).total_seconds()) + 1, reset_at=reset)
            # what remains today bounds the reply: the upstream is told so, and the cap holds
            admission.max_tokens = granted - prompt_tokens
            admission.action = "downgrade"
            admission.reasons.append(f"max_tokens clamped to the {granted} tokens left today")

    async def _nearly_spent(self, user_id: uuid.UUID, admission: Admission, cap: int) -> bool:
        """Whether the day's use before this request (spent + others' reservations) passed the mark."""
        threshold = self._config.downgrade_at
        if threshold is None:
            return False
        used = await self._pool.fetchval("SELECT tokens + reserved FROM daily_usage WHERE user_id = $1 AND day = $2",
                                         user_id, admission.day)
        return (used or 0) - admission.user_reserved >= threshold * cap

    async def release(self, admission: Admission, user_id: uuid.UUID, api_key_id: uuid.UUID | None) -> None:
        """A request admitted but never run (a duplicate, a vanished thread): hand its reservation back."""
        admission.done()
        if admission.user_reserved:
            await self._pool.execute("UPDATE daily_usage SET reserved = greatest(reserved - $3, 0) "
                                     "WHERE user_id = $1 AND day = $2", user_id, admission.day,
                                     admission.user_reserved)
        if admission.key_reserved and api_key_id is not None:
            await self._pool.execute("UPDATE key_daily_usage SET reserved = greatest(reserved - $3, 0) "
                                     "WHERE api_key_id = $1 AND day = $2", api_key_id, admission.day,
                                     admission.key_reserved)
        admission.user_reserved = admission.key_reserved = 0
