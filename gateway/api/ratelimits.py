"""OpenAI's rate-limit headers on a successful answer of the OpenAI-style routes (issue 15 item 4).

    x-ratelimit-limit-requests       the tightest requests-per-minute limit that applies
    x-ratelimit-remaining-requests   what is left of it in the current minute
    x-ratelimit-reset-requests       until that minute ends ("42s")
    x-ratelimit-limit-tokens         the tightest daily token cap (the gateway's caps are per UTC day)
    x-ratelimit-remaining-tokens     what is left of it today (this request's reservation taken)
    x-ratelimit-reset-tokens         until UTC midnight ("5h3m12s")

Only the limits configured for the caller appear (the user's from [limits], its key's and every
ancestor key's); with none, no header and no I/O. The numbers are read right after the admission
took this request's slot and reservation, while the upstream works (the read runs alongside it),
so they cost the answer no time; like OpenAI's they are advisory under concurrency.
"""

from __future__ import annotations

import asyncio
import logging
import math
from datetime import datetime, timedelta

from aiohttp import web

from ..auth import Principal
from ..policy import Limits, limits_for
from ..state import DB, POLICY, SETTINGS
from ..store import limits as store

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


async def _read(request: web.Request, principal: Principal, limits: Limits) -> dict[str, str]:
    app = request.app
    rpm = ([(f"u:{principal.user_id}", limits.user_rpm)] if limits.user_rpm is not None else []) + [
        (f"k:{cap.key_id}", cap.rpm) for cap in limits.key_chain if cap.rpm is not None]
    daily_keys = [cap for cap in limits.key_chain if cap.daily is not None]
    now: datetime = app[POLICY].clock()
    window = now.replace(second=0, microsecond=0)
    windows, user_day, key_days = await store.headroom(
        app[DB].pool, subjects=[s for s, _ in rpm], window=window, user_id=principal.user_id, day=now.date(),
        keys=[cap.key_id for cap in daily_keys])
    headers: dict[str, str] = {}
    if rpm:
        # the limit with the least left is the one a client must pace itself by
        limit, left = min(((lim, max(lim - used, 0)) for (_, lim), used in zip(rpm, windows, strict=True)),
                          key=lambda p: (p[1], p[0]))
        headers.update({"x-ratelimit-limit-requests": str(limit), "x-ratelimit-remaining-requests": str(left),
                        "x-ratelimit-reset-requests": duration((window + timedelta(minutes=1) - now).total_seconds())})
    caps = ([(limits.user_daily, user_day)] if limits.user_daily is not None else []) + [
        (cap.daily, used) for cap, used in zip(daily_keys, key_days, strict=True) if cap.daily is not None]
    if caps:
        limit, left = min(((cap, max(cap - used, 0)) for cap, used in caps), key=lambda p: (p[1], p[0]))
        midnight = datetime.combine(now.date() + timedelta(days=1), datetime.min.time(), now.tzinfo)
        headers.update({"x-ratelimit-limit-tokens": str(limit), "x-ratelimit-remaining-tokens": str(left),
                        "x-ratelimit-reset-tokens": duration((midnight - now).total_seconds())})
    return headers


class RateLimitHeaders:
    """The headers of one admitted request, read in the background from the moment it was admitted.

    `get()` before the response is prepared; `close()` in a `finally`, so a request that ends
    another way leaves no task behind."""

    __slots__ = ("_task",)

    def __init__(self, request: web.Request, principal: Principal) -> None:
        limits = limits_for(request.app[SETTINGS].limits, principal)
        self._task: asyncio.Task[dict[str, str]] | None = (
            asyncio.create_task(_read(request, principal, limits)) if _limited(limits) else None)

    async def get(self) -> dict[str, str]:
        if self._task is None:
            return {}
        try:
            return await asyncio.shield(self._task)
        except Exception:  # advisory numbers: a failed read costs the headers, never the answer
            log.warning("rate-limit headers not read", exc_info=True)
            return {}

    async def apply(self, response: web.StreamResponse) -> None:
        response.headers.update(await self.get())

    def close(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        if not task.done():
            task.cancel()
        elif not task.cancelled():
            task.exception()  # retrieved: a failure nobody waited for is not reported as lost
