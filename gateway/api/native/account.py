"""The caller's own account: who am I, what may I use, what have I used."""

from __future__ import annotations

import uuid
from contextlib import aclosing
from datetime import date
from typing import Any

import asyncpg
from aiohttp import web

from gateway.api.common import caller, json_response
from gateway.contract.operations import errors, ok, operation, query, response
from gateway.contract.replies import Me, UsageReport
from gateway.errors import BadRequest
from gateway.policy.admission import Limits, limits_for, utc_now
from gateway.state import DB, POLICY, SETTINGS
from gateway.store import limits as limits_store
from gateway.store import usage as usage_store
from gateway.store.limits import Budgets, month_of

MAX_RANGE_DAYS = 366
# day,model: a row per model and day (the playground's chart); key, day,key: per API key (its own use)
GROUPINGS = ("day", "model", "day,model", "key", "day,key")


@operation("The caller: user, key, limits in force, today's usage", "account",
           {**ok(200, "The caller", Me), **errors(401, 503)})
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
    budgets = await _budgets(pool, principal.user_id, limits, month_of(today))
    return json_response({
        "user": {"id": principal.user_id, "email": principal.email},
        "key": {"id": principal.api_key_id, "scopes": sorted(principal.scopes)} if principal.api_key_id else None,
        "limits": {"requests_per_minute": limits.user_rpm, "key_requests_per_minute": limits.key_rpm,
                   "daily_tokens": limits.user_daily, "key_daily_tokens": limits.key_daily,
                   "max_concurrent_streams": limits.max_concurrent, "max_tokens": limits.max_tokens,
                   "models": sorted(limits.models) if limits.models is not None else None},
        "today": {"day": today, **used, "active_streams": streams},
        "remaining": {"daily_tokens": remaining},
        "budgets": budgets,
        "budget_remaining": {window: _least([b["remaining"] for b in budgets if b["window"] == window], window)
                             for window in _WINDOWS},
    })


# a budget window: (its name, Budgets' attribute, whether it counts dollars, its period: month or life)
_WINDOWS = {"monthly_tokens": ("monthly", False, True), "monthly_cost_usd": ("monthly_cost", True, True),
            "total_tokens": ("total", False, False), "total_cost_usd": ("total_cost", True, False)}


def _least(left: list[float], window: str) -> float | int | None:
    if not left:
        return None
    return round(min(left), 8) if _WINDOWS[window][1] else int(min(left))


async def _budgets(pool: asyncpg.Pool, user_id: uuid.UUID, limits: Limits, month: str) -> list[dict[str, Any]]:
    """The month and lifetime budgets in force (the user's, then each key's of the caller's chain,
    leaf first), each with what it has used, what running replies hold and what is left."""
    owners: list[tuple[str, uuid.UUID | None, Budgets]] = []
    if limits.user_budgets is not None:
        owners.append((f"u:{user_id}", None, limits.user_budgets))
    owners += [(f"k:{k.key_id}", k.key_id, k.budgets) for k in limits.key_chain if k.budgets is not None]
    if not owners:
        return []
    use = await limits_store.budget_use(pool, [subject for subject, _, _ in owners], month)
    found = []
    for subject, key_id, budgets in owners:
        for window, (attribute, dollars, monthly) in _WINDOWS.items():
            cap = getattr(budgets, attribute)
            if cap is None:
                continue
            period = month if monthly else "total"
            tokens, reserved, cost, cost_reserved = use.get((subject, period), (0, 0, 0.0, 0.0))
            used, held = (round(cost, 8), round(cost_reserved, 8)) if dollars else (tokens, reserved)
            left = max(0, cap - used - held)
            found.append({"subject": "key" if key_id else "user", "key_id": key_id, "window": window,
                          "period": period, "limit": cap, "used": used, "reserved": held,
                          "remaining": round(left, 8) if dollars else left})
    return found


def _days(request: web.Request) -> tuple[date, date]:
    """The `from` and `to` UTC days of a usage query: `to` today and `from` 29 days before unless
    given; `from` after `to` is a 400."""
    to = _day(request.query.get("to"), "to", utc_now().date())
    # by ordinal: 29 days before 0001-01-05 is before the calendar (OverflowError, a 500)
    start = _day(request.query.get("from"), "from", date.fromordinal(max(1, to.toordinal() - 29)))
    if start > to:
        raise BadRequest("from must not be after to")
    return start, to


def _day(raw: str | None, name: str, default: date) -> date:
    if raw is None:
        return default
    try:
        return date.fromisoformat(raw)
    except ValueError:
        raise BadRequest(f"{name} must be a date (YYYY-MM-DD)") from None


@operation("Tokens by kind, cost and requests per day, model or API key (UTC days)", "account",
           {**ok(200, "The report", UsageReport), **errors(400, 401, 503)},
           parameters=[query("from", {"type": "string", "format": "date"}, "First day (default: 29 days before `to`)"),
                       query("to", {"type": "string", "format": "date"},
                             "Last day (default: today); the range spans at most 366 days"),
                       query("group_by", {"enum": ["day", "model", "day,model", "key", "day,key"], "default": "day"},
                             "Grouping (day,model: a row per model and day; key, day,key: per API key)")])
async def usage(request: web.Request) -> web.Response:
    principal = await caller(request)
    start, to = _days(request)
    if (to - start).days >= MAX_RANGE_DAYS:
        raise BadRequest(f"the range may span at most {MAX_RANGE_DAYS} days")
    group_by = request.query.get("group_by", "day")
    if group_by not in GROUPINGS:
        raise BadRequest("group_by must be day, model, key, day,model or day,key")
    rows = await usage_store.usage_report(request.app[DB].pool, principal.user_id, start, to, group_by)
    totals = {k: sum(r[k] for r in rows) for k in ("prompt_tokens", "completion_tokens", "total_tokens",
                                                   "input_tokens", "cached_tokens", "cache_write_tokens",
                                                   "reasoning_tokens", "requests")}
    totals["cost_usd"] = round(sum(r["cost_usd"] for r in rows), 8)
    return json_response({"from": start, "to": to, "group_by": group_by, "rows": rows, "totals": totals})


EXPORT_FORMATS = {"csv": "text/csv; charset=utf-8", "ndjson": "application/x-ndjson"}


@operation("Every reply's usage, one line each (CSV or NDJSON), streamed; admin: every user's", "account",
           {"200": response("The lines, oldest first", {"text/csv": {"schema": {"type": "string"}},
                                                         "application/x-ndjson": {"schema": {"type": "string"}}}),
            **errors(400, 401, 503)},
           parameters=[query("from", {"type": "string", "format": "date"},
                             "First UTC day (default: 29 days before `to`)"),
                       query("to", {"type": "string", "format": "date"}, "Last UTC day (default: today)"),
                       query("format", {"enum": ["csv", "ndjson"], "default": "csv"}, "Line format")])
async def usage_export(request: web.Request) -> web.StreamResponse:
    """GET /api/usage/export?from=&to=&format=csv|ndjson: one line per reply, streamed. A key with
    the admin scope exports every user's usage; anyone else their own."""
    principal = await caller(request)
    start, to = _days(request)
    fmt = request.query.get("format", "csv")
    if fmt not in EXPORT_FORMATS:
        raise BadRequest("format must be csv or ndjson")
    admin = "admin" in principal.scopes
    response = web.StreamResponse(headers={
        "Content-Type": EXPORT_FORMATS[fmt],
        "Content-Disposition": f'attachment; filename="usage-{start}-{to}.{fmt}"'})
    await response.prepare(request)
    first = True
    async with aclosing(usage_store.export_usage(request.app[DB].pool, None if admin else principal.user_id, start,
                                                 to, hide_pending=not admin)) as batches:
        async for batch in batches:
            await response.write(usage_store.export_lines([dict(r) for r in batch], fmt, header=first))
            first = False
    if first and fmt == "csv":
        await response.write(usage_store.export_lines([], fmt, header=True))
    await response.write_eof()
    return response
