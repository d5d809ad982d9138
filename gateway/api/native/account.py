"""The caller's own account: who am I, what may I use, what have I used."""

from __future__ import annotations

from datetime import date

from aiohttp import web

from gateway.api.common import caller, json_response
from gateway.errors import BadRequest
from gateway.policy.admission import limits_for, utc_now
from gateway.state import DB, POLICY, SETTINGS
from gateway.store import limits as limits_store
from gateway.store import usage as usage_store

MAX_RANGE_DAYS = 366
GROUPINGS = ("day", "model", "day,model")  # day,model: a row per model and day (the playground's chart)


async def me(request: web.Request) -> web.Response:
    principal = await caller(request)
    limits = limits_for(request.app[SETTINGS].limits, principal)
    policy, pool = request.app[POLICY], request.app[DB].pool
    today = utc_now().date()
    used = await usage_store.day_totals(pool, principal.user_id, today)
    # the unused part of this instance's quota slices is held ahead, not reserved by a request
    used["reserved"] = max(0, used["reserved"] - policy.unused_tokens(principal.user_id, today))
    # what the caller may still spend today: the tightest of its caps, each against its own day row
    # (the user's; the key's and each capped ancestor's count their subtree's use, not the user's)
    left = [limits.user_daily - used["tokens"] - used["reserved"]] if limits.user_daily is not None else []
    capped = [k for k in limits.key_chain if k.daily is not None]
    if capped:
        held = await limits_store.key_days_committed(pool, [k.key_id for k in capped], today)
        left += [k.daily - n + policy.unused_key_tokens(k.key_id, today)
                 for k, n in zip(capped, held, strict=True) if k.daily is not None]
    remaining = max(0, min(left)) if left else None
    # with a stream cap, the fleet-wide count the cap holds (policy.py); else this process's
    streams = (await usage_store.streams_running(pool, principal.user_id) if limits.max_concurrent
               else policy.active_streams(principal.user_id))
    return json_response({
        "user": {"id": principal.user_id, "email": principal.email},
        "key": {"id": principal.api_key_id, "scopes": sorted(principal.scopes)} if principal.api_key_id else None,
        "limits": {"requests_per_minute": limits.user_rpm, "key_requests_per_minute": limits.key_rpm,
                   "daily_tokens": limits.user_daily, "key_daily_tokens": limits.key_daily,
                   "max_concurrent_streams": limits.max_concurrent, "max_tokens": limits.max_tokens,
                   "models": sorted(limits.models) if limits.models is not None else None},
        "today": {"day": today, **used, "active_streams": streams},
        "remaining": {"daily_tokens": remaining},
    })


def _day(raw: str | None, name: str, default: date) -> date:
    if raw is None:
        return default
    try:
        return date.fromisoformat(raw)
    except ValueError:
        raise BadRequest(f"{name} must be a date (YYYY-MM-DD)") from None


async def usage(request: web.Request) -> web.Response:
    principal = await caller(request)
    today = utc_now().date()
    to = _day(request.query.get("to"), "to", today)
    # by ordinal: 29 days before 0001-01-05 is before the calendar (OverflowError, a 500)
    start = _day(request.query.get("from"), "from", date.fromordinal(max(1, to.toordinal() - 29)))
    if start > to:
        raise BadRequest("from must not be after to")
    if (to - start).days >= MAX_RANGE_DAYS:
        raise BadRequest(f"the range may span at most {MAX_RANGE_DAYS} days")
    group_by = request.query.get("group_by", "day")
    if group_by not in GROUPINGS:
        raise BadRequest("group_by must be day, model or day,model")
    rows = await usage_store.usage_report(request.app[DB].pool, principal.user_id, start, to, group_by)
    totals = {k: sum(r[k] for r in rows) for k in ("prompt_tokens", "completion_tokens", "total_tokens",
                                                   "input_tokens", "cached_tokens", "cache_write_tokens",
                                                   "reasoning_tokens", "requests")}
    totals["cost_usd"] = round(sum(r["cost_usd"] for r in rows), 8)
    return json_response({"from": start, "to": to, "group_by": group_by, "rows": rows, "totals": totals})
