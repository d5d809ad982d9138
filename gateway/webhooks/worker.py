"""The webhook worker: one per instance, in the background, never on a request's path.

Every `webhook_poll_s` it
- looks, among the users and keys that spent since its previous round (every one in its first),
  for budgets whose use has passed an endpoint's thresholds (`budget.threshold`) or all of
  the budget (`budget.exhausted`): the user's budgets from [limits] and each key's from its limits,
  for the UTC day, the UTC month and the whole life, in tokens and in dollars, as the settled usage
  counts them (what replies still running hold is not counted). Each crossing is queued once per
  endpoint, window and period across the fleet (the outbox's unique index);
- claims the outbox rows due now (outbox.claim: no other instance holds them) and posts each,
  signed (signing.py). A 2xx answer delivers it; anything else (an error status, a refused
  connection, no answer within DELIVERY_TIMEOUT_S) retries it after `webhook_retry_s`, doubling
  per attempt up to MAX_BACKOFF_S, until `webhook_give_up_s` after the event (24 hours by default):
  then it is dead-lettered, and `python -m gateway webhooks --dead` lists it.
So an event is delivered at least once (a receiver that answered 2xx after the worker died before
recording it gets it again, with the same webhook-id to tell).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from datetime import UTC, date, datetime, timedelta
from typing import Any

import aiohttp
import asyncpg

from gateway.config import LimitsConfig, WebhookConfig
from gateway.webhooks import outbox, signing
from gateway.webhooks.outbox import Event

log = logging.getLogger(__name__)

DELIVERY_TIMEOUT_S = 10.0
MAX_BACKOFF_S = 3600.0
CLAIM_BATCH = 20
# a claim outlives the longest attempt: a worker that dies mid-delivery lets its rows go after this
CLAIM_HOLD_S = DELIVERY_TIMEOUT_S * 3
BUDGET_EVENTS = ("budget.threshold", "budget.exhausted")

# Only the subjects that spent since the last round are read: the lifetime rows settled since $1
# (sql/0023, an index on settled_at), found in one index scan; the round's queries then read
# those users' and keys' rows by primary key. The first round of a process reads every subject.
# The round's start on the database's clock comes back with them, for the next round's $1.
_RECENT = """
SELECT now() AS at,
       coalesce(array_agg(substr(subject, 3)::uuid) FILTER (WHERE subject LIKE 'u:%'), '{}') AS users,
       coalesce(array_agg(substr(subject, 3)::uuid) FILTER (WHERE subject LIKE 'k:%'), '{}') AS keys
FROM budget_usage WHERE period = 'total' AND settled_at >= $1"""
# a settlement committed this long after its transaction began (its settled_at) is still seen
SETTLED_MARGIN_S = 60.0

# a key's budgets, by the name its limits give them, and the row that counts each ($1 the UTC day,
# $2 its month 'YYYY-MM'; a key's rows count its subtree's use), for the keys $4 only
_KEY_BUDGETS = """
SELECT k.id AS key_id, k.user_id, w.name, w.period, w.cap::float8 AS cap, w.used::float8 AS used
FROM api_keys k
CROSS JOIN LATERAL (VALUES
    ('daily_tokens', $1::text, (k.limits ->> 'daily_tokens')::numeric,
     (SELECT d.tokens::numeric FROM key_daily_usage d WHERE d.api_key_id = k.id AND d.day = $1::date)),
    ('daily_cost_usd', $1::text, (k.limits ->> 'daily_cost_usd')::numeric,
     (SELECT d.cost_usd FROM key_daily_usage d WHERE d.api_key_id = k.id AND d.day = $1::date)),
    ('monthly_tokens', $2::text, (k.limits ->> 'monthly_tokens')::numeric,
     (SELECT b.tokens::numeric FROM budget_usage b WHERE b.subject = 'k:' || k.id AND b.period = $2)),
    ('monthly_cost_usd', $2::text, (k.limits ->> 'monthly_cost_usd')::numeric,
     (SELECT b.cost_usd FROM budget_usage b WHERE b.subject = 'k:' || k.id AND b.period = $2)),
    ('total_tokens', 'total', (k.limits ->> 'total_tokens')::numeric,
     (SELECT b.tokens::numeric FROM budget_usage b WHERE b.subject = 'k:' || k.id AND b.period = 'total')),
    ('total_cost_usd', 'total', (k.limits ->> 'total_cost_usd')::numeric,
     (SELECT b.cost_usd FROM budget_usage b WHERE b.subject = 'k:' || k.id AND b.period = 'total'))
) AS w (name, period, cap, used)
WHERE k.id = ANY($4::uuid[]) AND k.limits IS NOT NULL AND k.revoked_at IS NULL AND w.cap IS NOT NULL
  AND w.used >= w.cap * $3"""

# a user's use in each window, for the users $3 only (the row's period is $1)
_USER_USE = {
    "daily_tokens": "SELECT user_id, tokens::float8 AS used FROM daily_usage WHERE user_id = ANY($3::uuid[]) "
                    "AND day = $1::text::date AND tokens >= $2",
    "daily_cost_usd": "SELECT user_id, cost_usd::float8 AS used FROM daily_usage WHERE user_id = ANY($3::uuid[]) "
                      "AND day = $1::text::date AND cost_usd >= $2",
    **{name: f"SELECT substr(subject, 3)::uuid AS user_id, {column}::float8 AS used FROM budget_usage "
             f"WHERE subject = ANY(SELECT 'u:' || u FROM unnest($3::uuid[]) u) AND period = $1 AND {column} >= $2"
       for name, column in (("monthly_tokens", "tokens"), ("monthly_cost_usd", "cost_usd"),
                            ("total_tokens", "tokens"), ("total_cost_usd", "cost_usd"))},
}


def backoff(attempts: int, first_s: float) -> float:
    """The delay before the next attempt, after `attempts` failed ones: doubling, at most an hour."""
    return float(min(first_s * 2 ** (attempts - 1), MAX_BACKOFF_S))


def _periods(day: date) -> dict[str, str]:
    month = f"{day.year:04d}-{day.month:02d}"
    return {"daily": day.isoformat(), "monthly": month, "total": "total"}


class WebhookWorker:
    """Delivers this instance's share of the outbox, and queues budget events (see the module doc)."""

    def __init__(self, pool: asyncpg.Pool, endpoints: tuple[WebhookConfig, ...], limits: LimitsConfig, *,
                 poll_s: float, retry_s: float, give_up_s: float) -> None:
        self._pool = pool
        self._endpoints: Mapping[str, WebhookConfig] = {e.url: e for e in endpoints}
        self._limits = limits
        self._poll_s, self._retry_s, self._give_up_s = poll_s, retry_s, give_up_s
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._queued: set[str] = set()  # budget crossings this process queued already (skip the insert)
        self._day: date | None = None
        self._since: datetime | None = None  # the last round's start less SETTLED_MARGIN_S (None: read all)
        self.delivered = 0
        self.failed = 0

    def start(self) -> None:
        if self._endpoints and self._task is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=DELIVERY_TIMEOUT_S))
            self._task = asyncio.get_running_loop().create_task(self._run(), name="webhooks")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _run(self) -> None:
        while True:
            try:
                await self.tick()
            except (asyncpg.PostgresError, OSError) as e:
                log.warning("webhooks: the outbox could not be read (%s); trying again", type(e).__name__)
            await asyncio.sleep(self._poll_s)

    async def tick(self) -> None:
        """One round: queue the budget crossings, then deliver what is due."""
        await self.queue_budget_events(datetime.now(UTC).date())
        while True:
            claimed = await outbox.claim(self._pool, CLAIM_BATCH, CLAIM_HOLD_S)
            if not claimed:
                return
            await asyncio.gather(*(self._deliver(c) for c in claimed))

    async def _deliver(self, claimed: outbox.Claimed) -> None:
        endpoint = self._endpoints.get(claimed.endpoint)
        if endpoint is None:  # no longer configured: nobody to try again for
            await outbox.failed(self._pool, claimed.id, "endpoint no longer configured", 0, 0)
            return
        assert self._session is not None
        sent = signing.headers(endpoint.secret, claimed.id, int(time.time()), claimed.body)
        try:
            async with self._session.post(endpoint.url, data=claimed.body, headers=sent,
                                          allow_redirects=False) as resp:
                ok, error = 200 <= resp.status < 300, f"HTTP {resp.status}"
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            ok, error = False, type(e).__name__
        if ok:
            await outbox.delivered(self._pool, claimed.id)
            self.delivered += 1
            return
        self.failed += 1
        dead = await outbox.failed(self._pool, claimed.id, error, backoff(claimed.attempts, self._retry_s),
                                   self._give_up_s)
        if dead:
            log.warning("webhook %s (%s) to %s dead-lettered after %d attempts: %s", claimed.id, claimed.event,
                        endpoint.url, claimed.attempts, error)

    def _marks(self) -> list[float]:
        """The fractions of a budget any endpoint wants to hear of (1.0: exhausted)."""
        marks: set[float] = set()
        for e in self._endpoints.values():
            if "budget.threshold" in e.events:
                marks.update(e.thresholds)
            if "budget.exhausted" in e.events:
                marks.add(1.0)
        return sorted(marks)

    async def queue_budget_events(self, day: date) -> int:
        """Queue an event for every budget past a mark not queued yet; returns the rows new."""
        marks = self._marks()
        if not marks:
            return 0
        if day != self._day:  # a new day: the day's (and maybe the month's) crossings are new ones
            self._day, self._queued = day, set()
        periods = _periods(day)
        recent = await self._pool.fetchrow(_RECENT, self._since or datetime.min.replace(tzinfo=UTC))
        self._since = recent["at"] - timedelta(seconds=SETTLED_MARGIN_S)
        users, keys = recent["users"], recent["keys"]
        found: list[tuple[dict[str, Any], float, float]] = []  # (who and which window, cap, used)
        rows = await self._pool.fetch(_KEY_BUDGETS, periods["daily"], periods["monthly"], marks[0],
                                      keys) if keys else []
        for r in rows:
            found.append(({"subject": "key", "key_id": str(r["key_id"]), "user_id": str(r["user_id"]),
                           "window": r["name"], "period": r["period"]}, r["cap"], r["used"]))
        for name, sql in _USER_USE.items():
            cap = getattr(self._limits, name)
            if cap is None or not users:
                continue
            period = periods[name.split("_")[0]]
            for r in await self._pool.fetch(sql, period, cap * marks[0], users):
                found.append(({"subject": "user", "user_id": str(r["user_id"]), "window": name, "period": period},
                              float(cap), r["used"]))
        events: list[Event] = []
        for who, cap, used in found:
            subject = who.get("key_id") or who["user_id"]
            for mark in marks:
                if used < cap * mark:
                    break
                kind = "budget.exhausted" if mark == 1.0 else "budget.threshold"
                dedupe = f"{kind}:{who['subject']}:{subject}:{who['window']}:{who['period']}" + (
                    "" if mark == 1.0 else f":{mark}")
                if dedupe in self._queued:
                    continue
                data = {**who, "limit": cap, "used": used, **({} if mark == 1.0 else {"threshold": mark})}
                events.append(Event(kind, data, dedupe))
        if not events:
            return 0
        # an endpoint hears of a threshold only if it asked for that fraction
        new = 0
        for endpoint in self._endpoints.values():
            wanted = [ev for ev in events if ev.type == "budget.exhausted"
                      or ev.data.get("threshold") in endpoint.thresholds]
            new += await outbox.enqueue(self._pool, (endpoint,), wanted)
        self._queued.update(ev.dedupe for ev in events)
        return new
