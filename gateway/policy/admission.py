"""Decide, part two: the operator's rules. One decision per request: approve, downgrade, or refuse.

Checks, in order: models allowed for the key (403), the max_tokens ceiling (downgrade: clamp),
then one database call (`gateway_admit_full`, see sql/0010_cost_caps_and_stream_leases.sql, after
sql/0003_policy.sql, sql/0007_admit_codes.sql and sql/0008_key_tree.sql; its SQL is in
store/limits.py) for requests per minute, concurrent streams and the daily token and cost caps,
per user and per key; its refusal names the limit that fired. Budgets by UTC month and for life
(`monthly_tokens`, `monthly_cost_usd`, `total_tokens`, `total_cost_usd`) ride in the same call
(`gateway_admit_budget`, sql/0018_budget_windows_and_webhooks.sql), reserving the same amounts;
a caller under one always takes that exact path (no quota slice). A key's limits are those of the key
and of every ancestor in its tree (api/native/keys.py): a child's request takes a slot in each
ancestor's window and stream count and reserves against each ancestor's daily caps, so a
parent's budget is shared by its subtree.

A daily cap reserves the request's worst case atomically: tokens (prompt estimate + max_tokens)
and dollars (prompt tokens x input price + max_tokens x output price, at the model's prices),
each clamped to what remains today, which bounds the reply's max_tokens; the finish write
settles them to the real usage, and a request that never runs releases them. A stream cap is a
counter in the database: the admission takes a lease on it (with this instance's id), the finish
write gives it back, and the sweep gives back the leases of an instance that died, so the cap
holds across instances. Nearly out of budget (tokens or dollars), a request may be downgraded to
a cheaper model.

A busy caller is admitted from a quota lease instead (gateway/policy/quota.py): a slice of its quota
leased ahead by one statement and spent in memory, so its requests make no database call; a
request the slice cannot cover gives the slice back and takes the exact path above.

A cap refuses or clamps a request only when what is left is really spent: before the exact path
refuses, or grants less than the request's worst case (which would clamp its max_tokens), it
brings back what holds the caller's budget without spending it (`_recall`): the usage records
this process has queued (finished requests whose reservations the batched writer has not
released yet), this process's slices of the user and other instances' (each gives the user's
slices back and leases none for a while). Then it asks once more, or reserves the rest it fell
short of. So back-to-back requests never meet a 429 while budget remains, and never a 200 after
one without new budget.

A refusal raises (TooManyRequests with a `reason`, or Forbidden). Chat turns split the decision
(turns.py): `admit_rate`, the abuse limit, runs at the edge before anything is written (its 429
persists nothing); `admit(..., rate=False)` runs after the user message is committed, and its
refusal is saved as a `refused` reply. The stateless routes call `admit` alone. With no limits
configured, the policy does no I/O at all.
"""

from __future__ import annotations

import asyncio
import logging
import math
import uuid
from collections.abc import Awaitable, Callable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from functools import partial
from typing import Any, Protocol

import asyncpg

from gateway.config import LimitsConfig, ModelConfig
from gateway.errors import Forbidden, TooManyRequests
from gateway.policy.quota import CALM_S, Ask, QuotaLeases
from gateway.store import limits as store
from gateway.store.limits import Limit, LimitReached
from gateway.vocabulary import PolicyAction, Principal

log = logging.getLogger(__name__)

# worst case assumed for a reply whose request names no max_tokens and no ceiling applies; under a
# daily cap it is also the bound the upstream is told (see _bounds)
DEFAULT_RESERVE_TOKENS = 1024
# how long a refused exact admission waits for the slices it recalled from other instances, and for
# this process's queued usage records to be written
RECALL_WAIT_S = 1.0
# a lifetime budget never resets: the Retry-After its refusal carries (a day) only paces retries
LIFETIME_RETRY_S = 86400


class Settlements(Protocol):
    """What releases finished requests' reservations off the request path: the batched usage writer
    (background.BatchWriter). `written` counts the records written so far, `depth` those queued."""

    written: int

    @property
    def depth(self) -> int: ...

    async def flush(self) -> None: ...


@dataclass(slots=True, kw_only=True)
class Admission:
    """What the policy granted one request, carried to its finish.

    `max_tokens` is what the upstream is told: the client's own, or less when a ceiling or what
    remains today clamps it (None when the client set none and nothing clamps). What it holds in
    the database (token and cost reservations, the stream lease) is given back by the finish's
    usage record (`held()`) or by `Policy.release`, exactly once either way. `on_done` gives back
    the request's place in this process's stream count; `done()` calls it at most once.
    """

    action: PolicyAction
    model: str
    max_tokens: int | None
    day: date
    user_reserved: int = 0
    key_reserved: int = 0
    user_cost_reserved: float = 0.0  # USD held against the daily cost caps
    key_cost_reserved: float = 0.0
    lease_id: uuid.UUID | None = None  # the stream lease, when a concurrency cap applies
    quota_id: uuid.UUID | None = None  # the quota slice its reservations came from (gateway/policy/quota.py)
    downgraded_from: str | None = None
    reasons: list[str] = field(default_factory=list)
    on_done: Callable[[], None] | None = field(default=None, repr=False, compare=False)

    def done(self) -> None:
        """Give back this process's count of the stream (idempotent)."""
        on_done, self.on_done = self.on_done, None
        if on_done is not None:
            on_done()

    def held(self) -> dict[str, Any]:
        """The usage record's fields that settle what this admission holds (store.usage.UsageRecord)."""
        return {"day": self.day, "user_reserved": self.user_reserved, "key_reserved": self.key_reserved,
                "user_cost_reserved": self.user_cost_reserved, "key_cost_reserved": self.key_cost_reserved,
                "lease_id": self.lease_id, "quota_id": self.quota_id}

    @property
    def holds_anything(self) -> bool:
        return bool(self.user_reserved or self.key_reserved or self.user_cost_reserved or self.key_cost_reserved
                    or self.lease_id)

    def reservation_json(self) -> dict[str, Any]:
        """What the sweep needs to settle the reservations of a reply whose instance died (its lease
        dies with the instance: store.limits.release_instance)."""
        held = {"day": self.day.isoformat(), "user_reserved": self.user_reserved, "key_reserved": self.key_reserved,
                "user_cost_reserved": self.user_cost_reserved, "key_cost_reserved": self.key_cost_reserved}
        if self.quota_id is not None:
            held["quota"] = str(self.quota_id)
        return held


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """The limits that apply to one caller: the user's from config, the key's and its ancestors'
    from their rows."""

    user_rpm: int | None
    key_rpm: int | None  # the key's own (the chain's are in key_chain)
    user_daily: int | None
    key_daily: int | None
    max_concurrent: int | None  # the lowest stream cap that applies (the user's or a key's)
    max_tokens: int | None
    models: frozenset[str] | None
    user_cost: float | None = None  # USD per UTC day
    key_cost: float | None = None  # the key's own
    user_streams: int | None = None  # the user's concurrent-stream cap (the keys' are in key_chain)
    # the key, then each ancestor, that has a limit counted in the database
    key_chain: tuple[store.KeyCap, ...] = ()
    user_budgets: store.Budgets | None = None  # the user's month and lifetime budgets

    @property
    def in_database(self) -> bool:
        """Whether admission needs the database at all."""
        return bool(self.user_rpm is not None or self.user_daily is not None or self.user_cost is not None
                    or self.user_streams is not None or self.key_chain or self.user_budgets is not None)

    @property
    def budgeted(self) -> bool:
        """Whether a month or lifetime budget applies: such callers take the exact path (no slice)."""
        return self.user_budgets is not None or any(k.budgets is not None for k in self.key_chain)

    @property
    def user_token_capped(self) -> bool:
        return self.user_daily is not None or (self.user_budgets is not None and self.user_budgets.tokens)

    @property
    def user_cost_capped(self) -> bool:
        return self.user_cost is not None or (self.user_budgets is not None and self.user_budgets.costs)

    @property
    def keys_token_capped(self) -> bool:
        return any(k.daily is not None or (k.budgets is not None and k.budgets.tokens) for k in self.key_chain)

    @property
    def keys_cost_capped(self) -> bool:
        return any(k.cost is not None or (k.budgets is not None and k.budgets.costs) for k in self.key_chain)


@dataclass(slots=True, kw_only=True)
class _Reservation:
    """What the database granted: tokens and USD reserved per cap, the lease, and the reply's bound
    if it had to shrink."""

    user: int = 0
    key: int = 0
    user_cost: float = 0.0
    key_cost: float = 0.0
    lease: uuid.UUID | None = None
    quota: uuid.UUID | None = None  # the slice it was served from
    max_tokens: int | None = None  # the completion tokens what remains today allows, when fewer than asked
    reasons: list[str] = field(default_factory=list)


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _usd_or_none(value: Any) -> float | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    return float(value) if ok else None


def worst_cost(prompt_tokens: int, completion_tokens: int, model: ModelConfig | None) -> float:
    """USD for the tokens at the model's prices, rounded up to the cent's millionth the columns keep
    (numeric(16, 8)): a reservation never falls short of the real cost."""
    if model is None:
        return 0.0
    # a prompt token at its dearest: uncached, cached or written to the cache, whichever costs most
    usd = (prompt_tokens * model.highest_input_price + completion_tokens * model.output_price_per_mtok) / 1e6
    return math.ceil(usd * 1e8 - 1e-6) / 1e8 if usd > 0 else 0.0


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
                         daily=_int_or_none(k.get("daily_tokens")), cost=_usd_or_none(k.get("daily_cost_usd")),
                         streams=_int_or_none(k.get("max_concurrent_streams")),
                         budgets=store.Budgets.of(_int_or_none(k.get("monthly_tokens")),
                                                  _usd_or_none(k.get("monthly_cost_usd")),
                                                  _int_or_none(k.get("total_tokens")),
                                                  _usd_or_none(k.get("total_cost_usd")))) for i, k in chain)
    return Limits(user_rpm=config.requests_per_minute, key_rpm=_int_or_none(key.get("requests_per_minute")),
                  user_daily=config.daily_tokens, key_daily=_int_or_none(key.get("daily_tokens")),
                  max_concurrent=min(concurrency) if concurrency else None,
                  max_tokens=min(ceilings) if ceilings else None, models=models,
                  user_cost=config.daily_cost_usd, key_cost=_usd_or_none(key.get("daily_cost_usd")),
                  user_streams=config.max_concurrent_streams,
                  key_chain=tuple(c for c in caps if c.limited),
                  user_budgets=store.Budgets.of(config.monthly_tokens, config.monthly_cost_usd, config.total_tokens,
                                                config.total_cost_usd))


class LimitsCache:
    """`limits_for`, once per configuration and key: a cached key's Principal (edge/auth.py) carries
    the same limits dict and ancestors tuple on every request, so its Limits are computed once, not
    twice per request (the admission and the OpenAI route's rate-limit headers) for every request.
    Entries are checked by identity, so a key read again (its limits changed) computes afresh."""

    MAX_ENTRIES = 4096  # keys in use at once; past it the cache starts over

    __slots__ = ("_known",)

    def __init__(self) -> None:
        self._known: dict[tuple[int, int, int, uuid.UUID | None],
                          tuple[LimitsConfig, dict[str, Any] | None, tuple[Any, ...], Limits]] = {}

    def get(self, config: LimitsConfig, principal: Principal) -> Limits:
        own, ancestors = principal.limits, principal.ancestors
        key = (id(config), id(own), id(ancestors), principal.api_key_id)
        hit = self._known.get(key)
        # the objects themselves are kept in the entry, so an id seen here cannot be a reused one
        if hit is not None and hit[0] is config and hit[1] is own and hit[2] is ancestors:
            return hit[3]
        limits = limits_for(config, principal)
        if len(self._known) >= self.MAX_ENTRIES:
            self._known.clear()
        self._known[key] = (config, own, ancestors, limits)
        return limits


def _bounds(limits: Limits, max_tokens: int | None, reasons: list[str]) -> tuple[int | None, int]:
    """What the upstream is told (the client's max_tokens, or the ceiling when it is lower: said in
    `reasons`) and the worst case reserved for. A client that names no bound gets the one the
    reservation assumes whenever a daily cap (tokens or dollars) applies, else a reply could run past
    what was reserved; and none otherwise (a ceiling alone clamps only the client's own): nothing is
    reserved, and the reply is the upstream's to end. What remains today may lower it later."""
    ceiling = max_tokens
    if limits.max_tokens is not None and max_tokens is not None and max_tokens > limits.max_tokens:
        ceiling = limits.max_tokens
        reasons.append(f"max_tokens clamped to {limits.max_tokens}")
    worst = ceiling or limits.max_tokens or DEFAULT_RESERVE_TOKENS
    if ceiling is None and (limits.user_token_capped or limits.user_cost_capped or limits.keys_token_capped
                            or limits.keys_cost_capped):
        ceiling = worst
    return ceiling, worst


def utc_now() -> datetime:
    return datetime.now(UTC)


def _next_midnight(day: date) -> datetime:
    return datetime.combine(day + timedelta(days=1), datetime.min.time(), UTC)


_WINDOW_WORDS = {"daily": "daily", "monthly": "monthly", "total": "lifetime"}


def next_month(day: date) -> datetime:
    """When the UTC month of `day` ends: a monthly budget's reset."""
    first = date(day.year + 1, 1, 1) if day.month == 12 else date(day.year, day.month + 1, 1)
    return datetime.combine(first, datetime.min.time(), UTC)


class Policy:
    def __init__(self, config: LimitsConfig, pool: asyncpg.Pool, clock: Callable[[], datetime] = utc_now, *,
                 models: Mapping[str, ModelConfig] | None = None, instance_id: uuid.UUID | None = None,
                 leasing: bool | None = None, settlements: Settlements | None = None) -> None:
        self._config = config
        self.limits = LimitsCache()  # the OpenAI route's rate-limit headers read it too
        self._pool = pool
        # the usage records this process has queued release what finished requests reserved: a cap
        # about to refuse or clamp has them written first
        self._settlements = settlements
        self.clock = clock  # injectable: tests pin it to step minutes
        self._models = models if models is not None else {}  # their prices bound the cost reservations
        # the leases this process takes die with it (the sweep gives them back): one id per instance
        self.instance_id = instance_id or uuid.uuid4()
        self._streams: dict[uuid.UUID, int] = {}  # this process's streams, per user (GET /api/me)
        # busy callers are admitted from slices leased ahead ([limits] quota_leases, on by default)
        on = config.quota_leases if leasing is None else leasing
        self.quota: QuotaLeases | None = QuotaLeases(pool, self.instance_id) if on else None

    async def close(self) -> None:
        """At shutdown, once every reply has settled: the unused slices go back."""
        if self.quota is not None:
            await self.quota.close()

    def active_streams(self, user_id: uuid.UUID) -> int:
        """The user's streams admitted by this process and not done yet."""
        return self._streams.get(user_id, 0)

    def recalled(self, user_id: uuid.UUID) -> None:
        """A peer (or this process) needs the user's quota: this process's slices of it go back."""
        if self.quota is not None:
            self.quota.recall(user_id)

    async def _exactly(self, user_id: uuid.UUID, admit: Callable[[], Awaitable[store.Grant]]) -> store.Grant:
        """One exact admission (gateway_admit_full). Refused while some of the user's quota is held
        and not spent (`_recall`), it brings that back and tries once more: a cap refuses only when
        what is left is really spent, never while it sits unused in a slice or in a finished
        request's reservation not yet released."""
        written = self._written()
        with self.quota.exact(user_id) if self.quota is not None else nullcontext():
            try:
                return await admit()
            except LimitReached as e:
                # the usage records release reservations and stream leases, never window slots
                if not await self._recall(user_id, None if e.limit.per_minute else written):
                    raise
            return await admit()

    def _written(self) -> int:
        return self._settlements.written if self._settlements is not None else 0

    async def _recall(self, user_id: uuid.UUID, written: int | None) -> bool:
        """Bring back what holds the user's quota without spending it: the usage records this process
        has queued (unless `written` is None; else the count of records written when the admission
        that fell short began), this process's slices of the user (leases in flight included), then
        other instances' (they give the user's slices back, and no instance leases the user one for
        CALM_S). Whether anything may have come back since that admission began."""
        back = False
        if written is not None and self._settlements is not None:
            try:
                if self._settlements.depth:
                    await asyncio.wait_for(self._settlements.flush(), RECALL_WAIT_S)
            except TimeoutError:
                back = True  # still being written: some of it may be released by now
            except RuntimeError:  # the writer has stopped (shutdown): nothing more will be written
                pass
            # a record written since the admission began (even just before this) may have released some
            back = back or self._settlements.written != written
        if self.quota is None:
            return back
        if self.quota.holds(user_id):
            back = await self.quota.recall_here(user_id) or back
        if await store.open_slices_elsewhere(self._pool, user_id, self.instance_id):
            await self._recall_elsewhere(user_id)
            back = True
        return back

    async def _top_up(self, user_id: uuid.UUID, limits: Limits, day: date, window: datetime, share: int,
                      grant: store.Grant, want: int, want_cost: float, *, tokens: bool, cost: bool) -> store.Grant:
        """A grant short of the worst case (`tokens`, `cost`: of which kind), after a recall: reserve
        what it fell short of, as far as what is left allows, on the same caps (no window slot, no
        stream lease: the first grant took them). The grant unchanged when nothing more is left."""
        keys = tuple(replace(k, rpm=None, streams=None, daily=k.daily if tokens else None,
                             cost=k.cost if cost else None,
                             budgets=k.budgets.only(tokens=tokens, cost=cost) if k.budgets else None)
                     for k in limits.key_chain)
        user_budgets = limits.user_budgets.only(tokens=tokens, cost=cost) if limits.user_budgets else None
        try:
            more = await store.admit_full(
                self._pool, user_id=user_id, keys=keys, day=day, window=window, user_rpm=None,
                want=want - grant.tokens if tokens else 0, user_cap=limits.user_daily if tokens else None,
                share=share, want_cost=round(want_cost - grant.cost, 8) if cost else 0.0,
                user_cost_cap=limits.user_cost if cost else None, user_budgets=user_budgets)
        except LimitReached:
            return grant
        return store.Grant(tokens=grant.tokens + more.tokens if tokens else grant.tokens,
                           cost=round(grant.cost + more.cost, 8) if cost else grant.cost, lease=grant.lease)

    async def _recall_elsewhere(self, user_id: uuid.UUID) -> None:
        await store.recall_quota(self._pool, user_id, CALM_S)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + RECALL_WAIT_S
        # a dead instance's slices stay open until the sweep: then this gives up after the wait
        while loop.time() < deadline and await store.open_slices_elsewhere(self._pool, user_id, self.instance_id):
            await asyncio.sleep(0.005)

    def reconnected(self) -> None:
        """This instance's liveness connection was lost and taken back: a peer may have taken it for
        dead and reclaimed its quota slices, so they are spent no more (what they still hold goes back,
        which is nothing for a reclaimed one)."""
        if self.quota is not None:
            self.quota.retire_all_soon()

    def unused_tokens(self, user_id: uuid.UUID, day: date) -> int:
        """Tokens this process's slices of the user hold against the user's daily cap and no request
        has taken yet (GET /api/me does not count them as reserved)."""
        return self.quota.unused_tokens(user_id, day) if self.quota is not None else 0

    def unused_key_tokens(self, key_id: uuid.UUID, day: date) -> int:
        """The same against a key's daily cap (the slices of callers whose key chain holds the key)."""
        return self.quota.unused_key_tokens(key_id, day) if self.quota is not None else 0

    async def admit_rate(self, principal: Principal) -> None:
        """The abuse limit alone, for the edge (before anything is written): a slot in this minute's
        window of the user and of each key of its chain that has one; TooManyRequests (nothing
        taken) when one is full. An `admit(..., rate=False)` for the same request then skips them."""
        limits = self.limits.get(self._config, principal)
        keys = tuple(replace(k, daily=None, cost=None, streams=None, budgets=None)
                     for k in limits.key_chain if k.rpm is not None)
        if limits.user_rpm is None and not keys:
            return
        now = self.clock()
        window = now.replace(second=0, microsecond=0)
        if self.quota is not None:
            caller = (principal.user_id, principal.api_key_id)
            self.quota.note(caller)
            if self.quota.take(caller, limits, now.date(), window, slot=True, tokens=0, cost=0.0,
                               stream=False) is not None:
                return
            await self.quota.retire(caller)
            self.quota.stats.exact += 1
        try:
            await self._exactly(principal.user_id, partial(
                store.admit_full, self._pool, user_id=principal.user_id, keys=keys, day=now.date(), window=window,
                user_rpm=limits.user_rpm, want=0, user_cap=None, share=1))
        except LimitReached as e:
            raise self._refusal(e.limit, limits, window, now.date(), now) from None

    async def admit(self, principal: Principal, model: str, prompt_tokens: int, max_tokens: int | None,
                    downgrade_to: str | None = None, share: int = 1, *, rate: bool = True) -> Admission:
        """`share`: this request is admitted together with share - 1 others (the arena's slots),
        so a daily reservation takes at most 1/share of what remains. `rate=False`: the request's
        per-minute slots were taken already (`admit_rate`, at the edge)."""
        full = limits = self.limits.get(self._config, principal)
        if not rate:
            chain = (replace(k, rpm=None) for k in limits.key_chain)
            limits = replace(limits, user_rpm=None, key_rpm=None, key_chain=tuple(k for k in chain if k.limited))
        now = self.clock()
        day = now.date()
        action, reasons = PolicyAction.APPROVE, list[str]()
        if limits.models is not None and model not in limits.models:
            raise Forbidden(f"this key may not use model {model!r}")
        ceiling, worst = _bounds(limits, max_tokens, reasons)
        if reasons:  # the client's own bound was lowered (the default one sent in its place is none)
            action = PolicyAction.DOWNGRADE
        reserved, downgraded_from = _Reservation(), None
        if limits.in_database:
            sliced = self._from_slice(principal, full, limits, day, model, worst, prompt_tokens, now, share, rate)
            if sliced is not None:
                reserved = sliced
            else:
                reserved = await self._admit_in_database(principal, limits, day, model, worst, prompt_tokens, now,
                                                         share)
                self._consider_slice(principal, full, day, model, worst, prompt_tokens, now, share)
            if reserved.max_tokens is not None:
                # what remains today bounds the reply: the upstream is told so, and the cap holds
                ceiling = reserved.max_tokens
                action = PolicyAction.DOWNGRADE
                reasons.extend(reserved.reasons)
            if (downgrade_to and downgrade_to != model
                    and (limits.user_daily is not None or limits.user_cost is not None)
                    and await self._nearly_spent(principal.user_id, day, reserved, limits)):
                action, downgraded_from, model = PolicyAction.DOWNGRADE, model, downgrade_to
                reasons.append("daily budget nearly spent")
        return self._admission(principal.user_id, action, model, ceiling, day, reserved, downgraded_from, reasons)

    def admit_now(self, principal: Principal, model: str, prompt_tokens: int,
                  max_tokens: int | None) -> Admission | None:
        """The whole admission (window slot included) when it needs no I/O: the caller's quota slice
        covers it (gateway/policy/quota.py), so nothing can refuse it. None otherwise, having taken nothing:
        then `admit_rate`, and `admit(rate=False)` after the commit, as usual. Lets a native turn
        carry its reservation in its persist statement (turns.py). No downgrade to a cheaper model
        here: that needs the day's totals, so a turn that may be downgraded takes the usual way."""
        if self.quota is None:
            return None
        limits = self.limits.get(self._config, principal)
        if (not limits.in_database or limits.budgeted
                or (limits.models is not None and model not in limits.models)):
            return None
        reasons: list[str] = []
        ceiling, worst = _bounds(limits, max_tokens, reasons)
        now = self.clock()
        reserved = self._from_slice(principal, limits, limits, now.date(), model, worst, prompt_tokens, now, 1,
                                    rate=True, note=False)
        if reserved is None:
            return None
        self.quota.note((principal.user_id, principal.api_key_id))
        action = PolicyAction.DOWNGRADE if reasons else PolicyAction.APPROVE
        return self._admission(principal.user_id, action, model, ceiling, now.date(), reserved, None, reasons)

    def _admission(self, user_id: uuid.UUID, action: PolicyAction, model: str, ceiling: int | None, day: date,
                   reserved: _Reservation, downgraded_from: str | None, reasons: list[str]) -> Admission:
        self._streams[user_id] = self.active_streams(user_id) + 1
        return Admission(action=action, model=model, max_tokens=ceiling, day=day, user_reserved=reserved.user,
                         key_reserved=reserved.key, user_cost_reserved=reserved.user_cost,
                         key_cost_reserved=reserved.key_cost, lease_id=reserved.lease, quota_id=reserved.quota,
                         downgraded_from=downgraded_from, reasons=reasons, on_done=partial(self._leave, user_id))

    def _leave(self, user_id: uuid.UUID) -> None:
        n = self._streams.get(user_id, 0) - 1
        if n > 0:
            self._streams[user_id] = n
        else:
            self._streams.pop(user_id, None)

    def _wants(self, limits: Limits, model: str, worst: int, prompt_tokens: int) -> tuple[int, float, bool, bool]:
        """One request's worst case under `limits`: tokens (0 when no token cap applies), USD (0.0 when
        no cost cap applies or the model is free), and whether token / cost caps hold it."""
        capped = limits.user_daily is not None or any(k.daily is not None for k in limits.key_chain)
        want_cost = worst_cost(prompt_tokens, worst, self._models.get(model))
        cost_held = want_cost > 0 and (limits.user_cost is not None
                                       or any(k.cost is not None for k in limits.key_chain))
        return (prompt_tokens + worst if capped else 0), (want_cost if cost_held else 0.0), capped, cost_held

    def _from_slice(self, principal: Principal, full: Limits, limits: Limits, day: date, model: str, worst: int,
                    prompt_tokens: int, now: datetime, share: int, rate: bool,
                    note: bool = True) -> _Reservation | None:
        """The request served from the caller's slice, in memory; None when it cannot be (no slice,
        too little left in it, an arena share): the exact path then."""
        if self.quota is None or share != 1 or limits.budgeted:
            return None  # month and lifetime budgets are taken on the exact path only
        caller = (principal.user_id, principal.api_key_id)
        if rate and note:
            self.quota.note(caller)
        tokens, cost, _, _ = self._wants(limits, model, worst, prompt_tokens)
        streams = limits.user_streams is not None or any(k.streams is not None for k in limits.key_chain)
        rated = limits.user_rpm is not None or any(k.rpm is not None for k in limits.key_chain)
        taken = self.quota.take(caller, full, day, now.replace(second=0, microsecond=0), slot=rated, tokens=tokens,
                                cost=cost, stream=streams)
        if taken is None:
            return None
        s, lease = taken
        keys_capped = any(k.daily is not None for k in limits.key_chain)
        keys_cost_capped = any(k.cost is not None for k in limits.key_chain)
        return _Reservation(user=tokens if limits.user_daily is not None else 0, key=tokens if keys_capped else 0,
                            user_cost=cost if limits.user_cost is not None else 0.0,
                            key_cost=cost if keys_cost_capped else 0.0, lease=lease, quota=s.id)

    def _consider_slice(self, principal: Principal, full: Limits, day: date, model: str, worst: int,
                        prompt_tokens: int, now: datetime, share: int) -> None:
        """After an exact admission: a busy caller gets a slice, leased in the background."""
        if self.quota is None or share != 1 or full.budgeted:
            return
        tokens, cost, _, _ = self._wants(full, model, worst, prompt_tokens)
        self.quota.consider(Ask(user_id=principal.user_id, api_key_id=principal.api_key_id, limits=full, day=day,
                                window=now.replace(second=0, microsecond=0), tokens=tokens, cost=cost))

    async def _admit_in_database(self, principal: Principal, limits: Limits, day: date, model: str, worst: int,
                                 prompt_tokens: int, now: datetime, share: int) -> _Reservation:
        keys_capped = limits.keys_token_capped
        capped = limits.user_token_capped or keys_capped
        keys_cost_capped = limits.keys_cost_capped
        priced = self._models.get(model)
        want = prompt_tokens + worst
        want_cost = worst_cost(prompt_tokens, worst, priced)
        streams = limits.user_streams is not None or any(k.streams is not None for k in limits.key_chain)
        lease = uuid.uuid4() if streams else None
        window = now.replace(second=0, microsecond=0)
        if self.quota is not None:
            # whatever the caller's slice still holds goes back first: the exact path sees all that is left
            await self.quota.retire((principal.user_id, principal.api_key_id))
            self.quota.stats.exact += 1
        written = self._written()
        try:
            grant = await self._exactly(principal.user_id, partial(
                store.admit_full, self._pool, user_id=principal.user_id, keys=limits.key_chain, day=day,
                window=window, user_rpm=limits.user_rpm, want=want, user_cap=limits.user_daily, share=share,
                want_cost=want_cost, user_cost_cap=limits.user_cost, lease=lease, instance_id=self.instance_id,
                user_streams=limits.user_streams, user_budgets=limits.user_budgets))
        except LimitReached as e:
            raise self._refusal(e.limit, limits, window, day, now) from None
        cost_held = want_cost > 0 and (limits.user_cost_capped or keys_cost_capped)
        short, short_cost = capped and grant.tokens < want, cost_held and grant.cost < want_cost
        if (short or short_cost) and await self._recall(principal.user_id, written):
            # what is left would clamp the reply: only after what was held unspent came back
            grant = await self._top_up(principal.user_id, limits, day, window, share, grant, want, want_cost,
                                       tokens=short, cost=short_cost)
        # every capped key of the chain holds the same reservation: settlement and release find them
        reserved = _Reservation(user=grant.tokens if capped and limits.user_token_capped else 0,
                                key=grant.tokens if keys_capped else 0,
                                user_cost=grant.cost if cost_held and limits.user_cost_capped else 0.0,
                                key_cost=grant.cost if cost_held and keys_cost_capped else 0.0,
                                lease=grant.lease)
        room = worst  # the completion tokens the grants leave room for
        if capped and grant.tokens < want:
            room = grant.tokens - prompt_tokens
            reserved.reasons.append(f"max_tokens clamped to the {grant.tokens} tokens left today")
        if cost_held and grant.cost < want_cost:
            assert priced is not None  # a cost was wanted
            out = priced.output_price_per_mtok / 1e6
            spare = grant.cost - worst_cost(prompt_tokens, 0, priced)
            affordable = int(spare / out) if out > 0 and spare > 0 else 0
            if affordable < room:
                room = affordable
                reserved.reasons.append(f"max_tokens clamped to the {affordable} tokens today's cost cap allows")
        if room < worst:
            if room <= 0:
                # not even the prompt fits in what remains: nothing to run
                await store.release(self._pool, user_id=principal.user_id, api_key_id=principal.api_key_id,
                                    day=day, user_tokens=reserved.user, key_tokens=reserved.key,
                                    user_cost=reserved.user_cost, key_cost=reserved.key_cost, lease=reserved.lease)
                what = "token" if capped and grant.tokens <= prompt_tokens else "cost"
                span = self._window_of(limits, tokens=what == "token")
                reset = (_next_midnight(day) if span == "daily" else next_month(day) if span == "monthly"
                         else None)
                retry = int((reset - now).total_seconds()) + 1 if reset is not None else LIFETIME_RETRY_S
                raise TooManyRequests(f"{_WINDOW_WORDS[span]} {what} {'cap' if span == 'daily' else 'budget'} "
                                      "reached (too little left for this prompt)", retry_after=retry, reset_at=reset,
                                      reason=f"{span}_{'tokens' if what == 'token' else 'cost'}")
            reserved.max_tokens = room
        return reserved

    @staticmethod
    def _window_of(limits: Limits, *, tokens: bool) -> str:
        """The shortest window with a cap of the kind that left too little: "daily", "monthly" or
        "total" (the grant does not say which cap it was; the shortest is the likeliest)."""
        budgets = [b for b in (limits.user_budgets, *(k.budgets for k in limits.key_chain)) if b is not None]
        if tokens:
            daily = limits.user_daily is not None or any(k.daily is not None for k in limits.key_chain)
            monthly = any(b.monthly is not None for b in budgets)
        else:
            daily = limits.user_cost is not None or any(k.cost is not None for k in limits.key_chain)
            monthly = any(b.monthly_cost is not None for b in budgets)
        return "daily" if daily else "monthly" if monthly else "total"

    @staticmethod
    def _refusal(limit: Limit, limits: Limits, window: datetime, day: date, now: datetime) -> TooManyRequests:
        name = limit.value.replace("_", " ")
        if limit.per_minute:
            reset = window + timedelta(minutes=1)
            return TooManyRequests(f"rate limit: {name}", retry_after=max(1, int((reset - now).total_seconds()) + 1),
                                   reset_at=reset, reason="requests_per_minute")
        if limit.concurrent:
            cap = limits.user_streams if limit is Limit.USER_CONCURRENT_STREAMS else min(
                k.streams for k in limits.key_chain if k.streams is not None)
            return TooManyRequests(f"at most {cap} concurrent streams ({name})", retry_after=1,
                                   reason="concurrent_streams")
        what = "cost" if limit.cost else "token"
        if limit.window == "monthly":
            reset = next_month(day)
            return TooManyRequests(f"monthly {what} budget reached ({name})",
                                   retry_after=int((reset - now).total_seconds()) + 1, reset_at=reset,
                                   reason="monthly_cost" if limit.cost else "monthly_tokens")
        if limit.window == "total":
            # a lifetime budget never resets: only a larger budget admits more
            return TooManyRequests(f"lifetime {what} budget reached ({name})", retry_after=LIFETIME_RETRY_S,
                                   reason="total_cost" if limit.cost else "total_tokens")
        reset = _next_midnight(day)
        return TooManyRequests(f"daily {what} cap reached ({name})",
                               retry_after=int((reset - now).total_seconds()) + 1, reset_at=reset,
                               reason="daily_cost" if limit.cost else "daily_tokens")

    async def _nearly_spent(self, user_id: uuid.UUID, day: date, reserved: _Reservation, limits: Limits) -> bool:
        """Whether the day's use before this request (spent + others' reservations) passed the mark,
        in tokens or in dollars."""
        threshold = self._config.downgrade_at
        if threshold is None:
            return False
        tokens, cost = await store.user_day_committed_both(self._pool, user_id, day)
        return ((limits.user_daily is not None and tokens - reserved.user >= threshold * limits.user_daily)
                or (limits.user_cost is not None and cost - reserved.user_cost >= threshold * limits.user_cost))

    async def release(self, admission: Admission, user_id: uuid.UUID, api_key_id: uuid.UUID | None) -> None:
        """A request admitted but never run (a duplicate, a vanished thread): give back its stream
        count and lease and hand its reservations back (the user's, its key's and every capped
        ancestor's). Exactly once: the admission forgets what it gave back."""
        admission.done()
        if admission.quota_id is None or self.quota is None or not self.quota.give_back(
                admission.quota_id, (user_id, api_key_id), max(admission.user_reserved, admission.key_reserved),
                max(admission.user_cost_reserved, admission.key_cost_reserved), admission.lease_id):
            await store.release(self._pool, user_id=user_id, api_key_id=api_key_id, day=admission.day,
                                user_tokens=admission.user_reserved, key_tokens=admission.key_reserved,
                                user_cost=admission.user_cost_reserved, key_cost=admission.key_cost_reserved,
                                lease=admission.lease_id, quota=admission.quota_id)
        admission.user_reserved = admission.key_reserved = 0
        admission.user_cost_reserved = admission.key_cost_reserved = 0.0
        admission.lease_id = admission.quota_id = None
