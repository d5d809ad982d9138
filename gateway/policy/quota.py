"""Quota leases: admission at memory speed for busy callers, the caps still exact.

As Google's Doorman or Envoy's global rate limit with local token buckets: an instance leases a
slice of a caller's (user and key) remaining quota from PostgreSQL in one atomic statement
(gateway_lease_quota, sql/0013_quota_leases.sql) and spends it in memory. A slice holds, in the
database, what an admission of many requests would: window slots of the current minute, tokens
and USD reserved on the day rows, and stream leases made ahead. A request served from it takes its
share in memory and carries it like any admission (`Admission.quota_id` names the slice), so its
finish settles it as before and takes it off the slice's row.

- Only a busy caller gets a slice: the first request, and any that comes more than
  LEASE_WITHIN_S after the previous one, takes the exact path (one gateway_admit_full call) and
  leases nothing. Slices are sized to about HORIZON_S of the caller's recent rate.
- A slice is renewed in the background when half of it is spent, so a busy caller rarely waits.
- A request the slice cannot serve (spent, a new minute, a new day, changed limits) first gives
  the unused part back, then takes the exact path: a cap is never overshot, and the last of a
  small cap is never stranded in a slice. A slice takes at most half of what a cap has left, so
  a second instance still finds some; an exact admission that would be refused or clamped while
  any instance's slices hold some of the user's quota recalls them first (gateway/policy.py).
- Unused slices go back after IDLE_S without a request, and at shutdown (`close`). When the
  instance dies, the sweep releases what its slices' rows still hold (gateway/fleet/instance.py).
- Every release of a slice's tokens or dollars from the day rows takes the same off its row, at
  most what the row holds, under the row's lock (sql/0016_slice_release.sql): a slice never
  releases more than it reserved, whoever releases it and however often.

Stream caps are leased the same way: a slice holds `streams` leases made ahead (counted in
stream_counts with this instance's id); each request takes one, and its finish gives it back
exactly as a per-request lease (the usage record). That is sound because a stream lease made
ahead is a place taken under the cap, and the running streams plus the places held ahead never
exceed it; the cost is that places held ahead are not available to another instance until this
one uses them or gives them back (at most IDLE_S later).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Protocol

import asyncpg

from gateway.store import limits as store


class Limits(Protocol):
    """The caps a slice is bounded by (admission's `Limits` is one): the user's from config, and the
    key's and its ancestors' counted in the database."""

    @property
    def user_rpm(self) -> int | None: ...

    @property
    def user_daily(self) -> int | None: ...

    @property
    def user_cost(self) -> float | None: ...

    @property
    def user_streams(self) -> int | None: ...

    @property
    def key_chain(self) -> tuple[store.KeyCap, ...]: ...

log = logging.getLogger(__name__)

HORIZON_S = 1.0  # a slice covers about this long of the caller's recent rate
LEASE_WITHIN_S = 1.0  # a request this soon after the caller's previous one marks the caller busy
IDLE_S = 2.0  # a slice unused this long goes back
MIN_SLICE, MAX_SLICE = 4, 256  # requests a slice is sized for
DRY_S = 1.0  # after a lease found nothing, do not ask again this soon
CALM_S = 5.0  # after a recall (a cap is nearly reached), a caller gets no slice for this long

Caller = tuple[uuid.UUID, "uuid.UUID | None"]  # (user, key)


@dataclass(slots=True, kw_only=True)
class Ask:
    """What a slice is leased for: the caller's limits and one request's worst case."""

    user_id: uuid.UUID
    api_key_id: uuid.UUID | None
    limits: Limits
    day: date
    window: datetime
    tokens: int  # one request's worst case, when a token cap applies (else 0)
    cost: float  # the same in USD, when a cost cap applies (else 0.0)

    @property
    def rated(self) -> bool:
        return self.limits.user_rpm is not None or any(k.rpm is not None for k in self.limits.key_chain)

    @property
    def streamed(self) -> bool:
        return self.limits.user_streams is not None or any(k.streams is not None for k in self.limits.key_chain)

    @property
    def subjects(self) -> tuple[str, ...]:
        """The windows a slice's request slots are in."""
        user = (f"u:{self.user_id}",) if self.limits.user_rpm is not None else ()
        return user + tuple(f"k:{k.key_id}" for k in self.limits.key_chain if k.rpm is not None)


@dataclass(slots=True, kw_only=True, eq=False)
class Slice:
    """One caller's lease, as this instance spends it: what is left of it in memory."""

    id: uuid.UUID
    ask: Ask  # what it was leased for (the limits it holds under, its day, its minute)
    size: int  # the requests it is sized for
    requests: int | None = None  # window slots left in ask.window (None: no window limit applies)
    tokens: int = 0
    cost: float = 0.0
    streams: list[uuid.UUID] = field(default_factory=list)
    used: float = 0.0  # when a request last took from it (monotonic)
    renewing: asyncio.Task[None] | None = None
    dry_until: float = 0.0
    seen: store.SliceGrant | None = None  # the last lease statement's grant and the counts it saw

    def taken(self) -> tuple[list[int], int | None, list[int | None]] | None:
        """What this caller's limits hold now as far as this slice knows, without I/O: the counts
        its last lease statement saw, less what the slice has not handed out yet (window counts in
        Ask.subjects order, the user's tokens today, each key's in key_chain order). Stale by the
        settlements since that lease (at most about HORIZON_S / 2 for a busy caller): advisory
        numbers, for the rate-limit headers."""
        seen = self.seen
        if seen is None:
            return None
        return self.less_unspent(seen.windows, seen.user_day, seen.key_days)

    def less_unspent(self, windows: list[int], user_day: int | None,
                     key_days: list[int | None]) -> tuple[list[int], int | None, list[int | None]]:
        """Counts of the caller's limits that include this slice's grants (its window slots in
        Ask.subjects order, its tokens on the user's and each capped key's day row), less what the
        slice has not handed out: what the caller took."""
        unspent = self.requests or 0
        return ([count - unspent for count in windows],
                None if user_day is None else user_day - self.tokens,
                [None if used is None else used - self.tokens for used in key_days])

    def low(self) -> bool:
        """Half spent (of whatever it holds): time to renew."""
        half = self.size / 2
        return ((self.requests is not None and self.requests < half)
                or (self.ask.tokens > 0 and self.tokens < self.ask.tokens * half)
                or (self.ask.cost > 0 and self.cost < self.ask.cost * half)
                or (self.ask.streamed and len(self.streams) < half))


@dataclass(slots=True)
class _Demand:
    last: float
    interval: float  # the time between the caller's requests, smoothed


@dataclass(slots=True)
class Stats:
    """What admission did, for tests and metrics: `exact` counts the database calls made on the
    request path (gateway_admit_full), `from_slice` the requests served from memory."""

    exact: int = 0
    from_slice: int = 0
    leases: int = 0  # slices leased from the database


class QuotaLeases:
    """This instance's slices, one per caller at most."""

    def __init__(self, pool: asyncpg.Pool, instance_id: uuid.UUID,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self._pool = pool
        self._instance_id = instance_id
        self._now = monotonic
        self._slices: dict[Caller, Slice] = {}
        self._demand: dict[Caller, _Demand] = {}
        self._leasing: dict[Caller, asyncio.Task[None]] = {}
        self._reaper: asyncio.Task[None] | None = None
        self._returning: set[asyncio.Task[None]] = set()
        self._calm: dict[uuid.UUID, float] = {}  # users recalled: no slice until then (monotonic)
        # exact admissions in flight, by user; callers whose first lease ran alongside one (the counts
        # it saw may miss that admission)
        self._exact: dict[uuid.UUID, int] = {}
        self._overlapped: set[Caller] = set()
        self._closed = False
        self.stats = Stats()

    def held(self, caller: Caller) -> Slice | None:
        return self._slices.get(caller)

    def leasing(self, caller: Caller) -> asyncio.Task[None] | None:
        """The caller's first lease, while its statement is in flight (its slice not held yet)."""
        return self._leasing.get(caller)

    @contextmanager
    def exact(self, user_id: uuid.UUID) -> Iterator[None]:
        """Around an exact admission of the user: a first lease of the user's that runs alongside
        it may or may not see it, so that slice reports no counts (`Slice.taken`) until renewed."""
        self._overlapped.update(c for c in self._leasing if c[0] == user_id)
        self._exact[user_id] = self._exact.get(user_id, 0) + 1
        try:
            yield
        finally:
            left = self._exact.pop(user_id) - 1
            if left:
                self._exact[user_id] = left

    def unused_tokens(self, user_id: uuid.UUID, day: date) -> int:
        return sum(s.tokens for (user, _), s in self._slices.items()
                   if user == user_id and s.ask.day == day and s.ask.limits.user_daily is not None)

    def unused_key_tokens(self, key_id: uuid.UUID, day: date) -> int:
        """What the slices hold on a key's day row and have not handed out: a slice's tokens are
        reserved on every key of its caller's chain that has a token cap."""
        return sum(s.tokens for s in self._slices.values()
                   if s.ask.day == day and any(k.key_id == key_id and k.daily is not None
                                               for k in s.ask.limits.key_chain))

    def holds(self, user_id: uuid.UUID) -> bool:
        """Whether this instance holds a slice of the user's quota, or is leasing one."""
        return any(c[0] == user_id for c in self._slices) or any(c[0] == user_id for c in self._leasing)

    def note(self, caller: Caller) -> None:
        """One request of the caller arrived (once per request)."""
        now = self._now()
        demand = self._demand.get(caller)
        if demand is None:
            self._demand[caller] = _Demand(now, LEASE_WITHIN_S * 2)
        else:
            demand.interval = 0.7 * demand.interval + 0.3 * (now - demand.last)
            demand.last = now

    def take(self, caller: Caller, limits: Limits, day: date, window: datetime, *, slot: bool, tokens: int,
             cost: float, stream: bool) -> tuple[Slice, uuid.UUID | None] | None:
        """Serve one request from the caller's slice, in memory: a window slot (`slot`), `tokens`
        and `cost` (0: none needed), a stream lease (`stream`). None (nothing taken) when the slice
        is missing or cannot cover all of it."""
        s = self._slices.get(caller)
        if s is None or s.ask.limits != limits or s.ask.day != day:
            return None
        if slot and s.requests is not None and (s.ask.window != window or s.requests < 1):
            return None
        if s.tokens < tokens or s.cost < cost or (stream and not s.streams):
            return None
        if slot and s.requests is not None:
            s.requests -= 1
        s.tokens -= tokens
        s.cost = round(s.cost - cost, 8)  # USD to the 1e-8 the columns keep: no float drift
        lease = s.streams.pop() if stream else None
        s.used = self._now()
        self.stats.from_slice += 1
        if s.low() and s.renewing is None and s.dry_until <= s.used and not self._closed:
            s.renewing = asyncio.get_running_loop().create_task(self._renew(s), name="quota-renew")
        return s, lease

    def give_back(self, quota_id: uuid.UUID, caller: Caller, tokens: int, cost: float,
                  stream: uuid.UUID | None) -> bool:
        """A request served from a slice never ran: its share goes back into the slice, if the
        slice is still this caller's (else False: the caller releases it in the database)."""
        s = self._slices.get(caller)
        if s is None or s.id != quota_id:
            return False
        s.tokens += tokens
        s.cost = round(s.cost + cost, 8)
        if stream is not None:
            s.streams.append(stream)
        return True

    def consider(self, ask: Ask) -> None:
        """After an exact admission: lease a slice in the background if the caller is busy."""
        caller = (ask.user_id, ask.api_key_id)
        demand = self._demand.get(caller)
        if (self._closed or demand is None or demand.interval >= LEASE_WITHIN_S or caller in self._slices
                or caller in self._leasing or self._calm.get(ask.user_id, 0.0) > self._now()):
            return
        s = Slice(id=uuid.uuid4(), ask=ask, size=self._size(caller))
        task = asyncio.get_running_loop().create_task(self._first(caller, s), name="quota-lease")
        self._leasing[caller] = task

    def _size(self, caller: Caller) -> int:
        """The requests a slice of the caller is sized for: about HORIZON_S of its recent rate."""
        demand = self._demand.get(caller)
        interval = demand.interval if demand is not None else LEASE_WITHIN_S
        return max(MIN_SLICE, min(MAX_SLICE, math.ceil(HORIZON_S / max(interval, 1e-6))))

    async def _first(self, caller: Caller, s: Slice) -> None:
        if self._exact.get(caller[0]):
            self._overlapped.add(caller)
        try:
            if (await self._lease(s) and not self._closed and caller not in self._slices
                    and self._calm.get(caller[0], 0.0) <= self._now()):
                if caller in self._overlapped:
                    s.seen = None  # the counts it saw may miss an admission: none reported until a renewal
                s.used = self._now()
                self._slices[caller] = s
                if self._reaper is None:
                    self._reaper = asyncio.get_running_loop().create_task(self._reap(), name="quota-reaper")
            elif s.tokens or s.cost or s.streams or s.requests:
                await self._give_back(s)  # closing meanwhile
        finally:
            self._leasing.pop(caller, None)
            self._overlapped.discard(caller)

    async def _renew(self, s: Slice) -> None:
        s.size = self._size((s.ask.user_id, s.ask.api_key_id))  # the slice follows the caller's rate
        try:
            if not await self._lease(s):
                s.dry_until = self._now() + DRY_S
        finally:
            s.renewing = None

    async def _lease(self, s: Slice) -> bool:
        """One lease statement for `s`, its grant added to it; False if nothing was left to lease."""
        # a renewal in a later minute adds slots to a past one: harmless, and the next request that
        # needs a slot retires the slice (take)
        ask = s.ask
        try:
            grant = await store.lease_quota(
                self._pool, lease=s.id, instance_id=self._instance_id, user_id=ask.user_id,
                api_key_id=ask.api_key_id, keys=ask.limits.key_chain, day=ask.day, window=ask.window,
                user_rpm=ask.limits.user_rpm, requests=s.size if ask.rated else None, want=ask.tokens * s.size,
                least=ask.tokens, user_cap=ask.limits.user_daily, want_cost=ask.cost * s.size, least_cost=ask.cost,
                user_cost_cap=ask.limits.user_cost, user_streams=ask.limits.user_streams,
                streams=s.size if ask.streamed else 0)
        except store.NoSlice:
            return False
        except (asyncpg.PostgresError, OSError) as e:
            log.warning("quota lease failed (%s): requests take the exact path", type(e).__name__)
            return False
        finally:
            self.stats.leases += 1
        if grant.requests is not None:
            s.requests = (s.requests or 0) + grant.requests
        s.tokens += grant.tokens
        s.cost = round(s.cost + grant.cost, 8)
        s.streams.extend(grant.streams)
        s.seen = grant
        return True

    async def retire(self, caller: Caller) -> None:
        """Give back the caller's slice (its unused part), before an exact admission."""
        s = self._slices.pop(caller, None)
        if s is not None:
            await self._give_back(s)

    async def _give_back(self, s: Slice) -> None:
        if s.renewing is not None:
            await asyncio.gather(s.renewing, return_exceptions=True)  # its grant goes back too
        tokens, cost, requests, streams = s.tokens, s.cost, s.requests or 0, list(s.streams)
        s.tokens, s.cost, s.requests, s.streams = 0, 0.0, 0, []
        try:
            await store.return_quota(self._pool, lease=s.id, tokens=tokens, cost=cost, window=s.ask.window,
                                     subjects=s.ask.subjects, requests=requests, streams=streams)
        except (asyncpg.PostgresError, OSError) as e:
            # what the slice holds stays reserved until the sweep reclaims it (this instance's end)
            log.warning("quota slice %s could not be given back (%s)", s.id, type(e).__name__)

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(IDLE_S / 2)
            now = self._now()
            for caller, s in list(self._slices.items()):
                if now - s.used > IDLE_S and self._slices.get(caller) is s:
                    await self.retire(caller)
            for caller, demand in list(self._demand.items()):
                if now - demand.last > 60:
                    del self._demand[caller]
            for user, until in list(self._calm.items()):
                if until < now:
                    del self._calm[user]

    def recall(self, user_id: uuid.UUID) -> None:
        """A peer needs the user's quota (its exact admission was refused while slices held some):
        the user's slices go back, and the user gets none for CALM_S."""
        self._calm[user_id] = self._now() + CALM_S
        self._retire_soon([c for c in self._slices if c[0] == user_id])

    async def recall_here(self, user_id: uuid.UUID) -> bool:
        """`recall`, done before returning (leases in flight included); whether a slice went back."""
        self._calm[user_id] = self._now() + CALM_S
        leasing = [t for c, t in self._leasing.items() if c[0] == user_id]
        await asyncio.gather(*leasing, return_exceptions=True)  # they give back what they got (calm)
        callers = [c for c in self._slices if c[0] == user_id]
        for caller in callers:
            await self.retire(caller)
        return bool(callers or leasing)

    def retire_all_soon(self) -> None:
        """Stop spending every slice now, give their unused parts back in the background."""
        self._retire_soon(list(self._slices))

    def _retire_soon(self, callers: list[Caller]) -> None:
        for caller in callers:
            s = self._slices.pop(caller)
            task = asyncio.get_running_loop().create_task(self._give_back(s), name="quota-return")
            self._returning.add(task)
            task.add_done_callback(self._returning.discard)

    async def close(self) -> None:
        """Shutdown, once the replies have settled: every unused slice goes back."""
        self._closed = True
        if self._reaper is not None:
            self._reaper.cancel()
            await asyncio.gather(self._reaper, return_exceptions=True)
        await asyncio.gather(*self._leasing.values(), *self._returning, return_exceptions=True)
        for caller in list(self._slices):
            await self.retire(caller)
