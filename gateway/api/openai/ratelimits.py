"""OpenAI's rate-limit headers on a successful answer of the OpenAI-style routes.

    x-ratelimit-limit-requests       the tightest requests-per-minute limit that applies
    x-ratelimit-remaining-requests   what is left of it in the current minute
    x-ratelimit-reset-requests       until that minute ends ("42s")
    x-ratelimit-limit-tokens         the tightest daily token cap (the gateway's caps are per UTC day)
    x-ratelimit-remaining-tokens     what is left of it today (this request's reservation taken)
    x-ratelimit-reset-tokens         until UTC midnight ("5h3m12s")

Only the limits configured for the caller appear (the user's from [limits], its key's and every
ancestor key's); with none, no header and no I/O. A busy caller, admitted from a quota slice
(gateway/policy/quota.py), gets them from what the slice's last lease statement saw, less what the slice
has not handed out: no I/O. Otherwise they are read right after the admission took
this request's slot and reservation, while the upstream works (the read runs alongside it), so
they cost the answer no time; a lease of the caller's slice in flight (one that admission may have
started) is waited for, and what the instance's slice holds unused is taken off what is read.
Like OpenAI's they are advisory under concurrency (a slice's numbers lag the settlements since its
last lease by about a second at most).
"""

from __future__ import annotations

import asyncio
import logging
import math
from datetime import datetime, timedelta

from aiohttp import web

from gateway.edge.auth import Principal
from gateway.policy.admission import Limits
from gateway.state import DB, POLICY, SETTINGS
from gateway.store import limits as store

log = logging.getLogger(__name__)


def duration(seconds: float) -> str:
    """As OpenAI writes its resets: "59s", "6m0s", "5h3m12s" (whole seconds, rounded up)."""
    total = max(0, math.ceil(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def _limited(limits: Limits) -> bool:
    return limits.user_rpm is not None or limits.user_daily is not None or bool(limits.key_chain)


def _compose(limits: Limits, now: datetime, windows: list[int], user_day: int | None,
             key_days: list[int | None]) -> dict[str, str]:
    """The headers from what is taken: each window's count (the `_rpm` order), the user's tokens
    today, each key's (key_chain order, None where it has no token cap)."""
    window = now.replace(second=0, microsecond=0)
    headers: dict[str, str] = {}
    rpm = _rpm_of(limits)
    if rpm:
        # the limit with the least left is the one a client must pace itself by
        limit, left = min(((lim, max(lim - used, 0)) for lim, used in zip(rpm, windows, strict=True)),
                          key=lambda p: (p[1], p[0]))
        headers.update({"x-ratelimit-limit-requests": str(limit), "x-ratelimit-remaining-requests": str(left),
                        "x-ratelimit-reset-requests": duration((window + timedelta(minutes=1) - now).total_seconds())})
    caps = ([(limits.user_daily, user_day or 0)] if limits.user_daily is not None else []) + [
        (cap.daily, used or 0) for cap, used in zip(limits.key_chain, key_days, strict=True) if cap.daily is not None]
    if caps:
        limit, left = min(((cap, max(cap - used, 0)) for cap, used in caps), key=lambda p: (p[1], p[0]))
        midnight = datetime.combine(now.date() + timedelta(days=1), datetime.min.time(), now.tzinfo)
        headers.update({"x-ratelimit-limit-tokens": str(limit), "x-ratelimit-remaining-tokens": str(left),
                        "x-ratelimit-reset-tokens": duration((midnight - now).total_seconds())})
    return headers


def _rpm_of(limits: Limits) -> list[int]:
    return ([limits.user_rpm] if limits.user_rpm is not None else []) + [
        cap.rpm for cap in limits.key_chain if cap.rpm is not None]


def _from_slice(request: web.Request, principal: Principal, limits: Limits, now: datetime) -> dict[str, str] | None:
    """The headers from the caller's quota slice, when it holds this minute's and today's quota under
    these limits (a busy caller: gateway/policy/quota.py): no I/O. None otherwise."""
    quota = request.app[POLICY].quota
    s = quota.held((principal.user_id, principal.api_key_id)) if quota is not None else None
    if s is None or s.ask.limits != limits or s.ask.day != now.date():
        return None
    if _rpm_of(limits) and s.ask.window != now.replace(second=0, microsecond=0):
        return None  # its window counts are of another minute
    taken = s.taken()
    if taken is None:
        return None
    windows, user_day, key_days = taken
    return _compose(limits, now, windows, user_day, key_days)


async def _read(request: web.Request, principal: Principal, limits: Limits, now: datetime) -> dict[str, str]:
    """The headers of a request admitted exactly, read from the database. The caller's quota slice,
    when this instance holds one, has its grants in what is read but has not handed all of them out:
    what it still holds is not the caller's. So a lease of it in flight (one this request's
    admission started: quota.py `consider`) or a renewal is waited for first, and what the slice
    holds is taken off what is read."""
    quota = request.app[POLICY].quota
    caller = (principal.user_id, principal.api_key_id)
    if quota is not None:
        leasing = quota.leasing(caller)
        if leasing is not None:
            await asyncio.shield(leasing)  # the lease is the instance's, not this request's to cancel
        held = quota.held(caller)
        if held is not None and held.renewing is not None:
            await asyncio.shield(held.renewing)
    s = quota.held(caller) if quota is not None else None
    window = now.replace(second=0, microsecond=0)
    subjects = ([f"u:{principal.user_id}"] if limits.user_rpm is not None else []) + [
        f"k:{cap.key_id}" for cap in limits.key_chain if cap.rpm is not None]
    daily_keys = [cap.key_id for cap in limits.key_chain if cap.daily is not None]
    windows, user_day, days = await store.headroom(
        request.app[DB].pool, subjects=subjects, window=window, user_id=principal.user_id, day=now.date(),
        keys=daily_keys)
    by_key = dict(zip(daily_keys, days, strict=True))
    key_days: list[int | None] = [by_key.get(cap.key_id) for cap in limits.key_chain]
    if (s is not None and quota is not None and quota.held(caller) is s and s.renewing is None
            and s.ask.limits == limits and s.ask.day == now.date() and s.ask.window == window):
        windows, held_day, key_days = s.less_unspent(windows, user_day if limits.user_daily is not None else None,
                                                     key_days)
        user_day = held_day or 0
    return _compose(limits, now, windows, user_day, key_days)


_NONE: dict[str, str] = {}  # never written to: what an applied RateLimitHeaders keeps


class RateLimitHeaders:
    """The headers of one admitted request, read in the background from the moment it was admitted.

    `get()` before the response is prepared; `close()` in a `finally`, so a request that ends
    another way leaves no task behind."""

    __slots__ = ("_task", "_known")

    def __init__(self, request: web.Request, principal: Principal) -> None:
        limits = request.app[POLICY].limits.get(request.app[SETTINGS].limits, principal)
        self._task: asyncio.Task[dict[str, str]] | None = None
        self._known: dict[str, str] = {}
        if not _limited(limits):
            return
        now: datetime = request.app[POLICY].clock()
        known = _from_slice(request, principal, limits, now)
        if known is not None:
            self._known = known
        else:
            self._task = asyncio.create_task(_read(request, principal, limits, now))

    async def get(self) -> dict[str, str]:
        if self._task is None:
            return self._known
        try:
            return await asyncio.shield(self._task)
        except Exception:  # advisory numbers: a failed read costs the headers, never the answer
            log.warning("rate-limit headers not read", exc_info=True)
            return {}

    async def apply(self, response: web.StreamResponse) -> None:
        """Put the headers on `response`, then let go of them and of the task that read them: a
        held stream keeps this object to its end, for `close()`."""
        response.headers.update(await self.get())
        self.close()
        self._known = _NONE

    def close(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        if not task.done():
            task.cancel()
        elif not task.cancelled():
            task.exception()  # retrieved: a failure nobody waited for is not reported as lost
