"""SQL for admission: per-minute request windows, daily token and cost reservations and stream
leases (per user, per key), and their housekeeping.

`admit_full` is one call to `gateway_admit_full` (sql/0010_cost_caps_and_stream_leases.sql;
gateway_admit_chain of sql/0008_key_tree.sql plus cost caps and concurrency leases): it takes the
request's rate-window slots and stream counters and reserves its worst case (tokens and USD)
atomically, for the user and for the caller's key and every ancestor of it that has limits, or
changes nothing and raises `LimitReached` naming the limit, read from the function's SQLSTATE.
What it holds is given back by the finish's usage record (store/usage.py), by `release` for a
request that never ran, or by `release_instance` when its instance died.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from decimal import Decimal
from enum import StrEnum

import asyncpg


class Limit(StrEnum):
    """A limit `gateway_admit` enforces; the value is the name its error message carries."""

    USER_REQUESTS_PER_MINUTE = "user_requests_per_minute"
    KEY_REQUESTS_PER_MINUTE = "key_requests_per_minute"
    USER_DAILY_TOKENS = "user_daily_tokens"
    KEY_DAILY_TOKENS = "key_daily_tokens"
    USER_DAILY_COST = "user_daily_cost"
    KEY_DAILY_COST = "key_daily_cost"
    USER_CONCURRENT_STREAMS = "user_concurrent_streams"
    KEY_CONCURRENT_STREAMS = "key_concurrent_streams"
    USER_MONTHLY_TOKENS = "user_monthly_tokens"
    KEY_MONTHLY_TOKENS = "key_monthly_tokens"
    USER_MONTHLY_COST = "user_monthly_cost"
    KEY_MONTHLY_COST = "key_monthly_cost"
    USER_TOTAL_TOKENS = "user_total_tokens"
    KEY_TOTAL_TOKENS = "key_total_tokens"
    USER_TOTAL_COST = "user_total_cost"
    KEY_TOTAL_COST = "key_total_cost"

    @property
    def per_minute(self) -> bool:
        return self in (Limit.USER_REQUESTS_PER_MINUTE, Limit.KEY_REQUESTS_PER_MINUTE)

    @property
    def cost(self) -> bool:
        return self.value.endswith("_cost")

    @property
    def window(self) -> str:
        """The budget window it counts in: "daily", "monthly" or "total" (a rate or stream limit: "")."""
        for window in ("daily", "monthly", "total"):
            if f"_{window}_" in self.value:
                return window
        return ""

    @property
    def concurrent(self) -> bool:
        return self in (Limit.USER_CONCURRENT_STREAMS, Limit.KEY_CONCURRENT_STREAMS)


# the one mapping from gateway_admit's SQLSTATEs to limits (the tables in sql/0007_admit_codes.sql
# and sql/0010_cost_caps_and_stream_leases.sql)
SQLSTATES: dict[str, Limit] = {
    "GW4R1": Limit.USER_REQUESTS_PER_MINUTE,
    "GW4R2": Limit.KEY_REQUESTS_PER_MINUTE,
    "GW4D1": Limit.USER_DAILY_TOKENS,
    "GW4D2": Limit.KEY_DAILY_TOKENS,
    "GW4C1": Limit.USER_DAILY_COST,
    "GW4C2": Limit.KEY_DAILY_COST,
    "GW4S1": Limit.USER_CONCURRENT_STREAMS,
    "GW4S2": Limit.KEY_CONCURRENT_STREAMS,
    # budgets by month and for life (sql/0018_budget_windows_and_webhooks.sql)
    "GW4M1": Limit.USER_MONTHLY_TOKENS,
    "GW4M2": Limit.KEY_MONTHLY_TOKENS,
    "GW4N1": Limit.USER_MONTHLY_COST,
    "GW4N2": Limit.KEY_MONTHLY_COST,
    "GW4T1": Limit.USER_TOTAL_TOKENS,
    "GW4T2": Limit.KEY_TOTAL_TOKENS,
    "GW4U1": Limit.USER_TOTAL_COST,
    "GW4U2": Limit.KEY_TOTAL_COST,
}


class LimitReached(Exception):
    """`gateway_admit` refused: `limit` is full. Nothing was taken or reserved."""

    def __init__(self, limit: Limit) -> None:
        super().__init__(limit.value)
        self.limit = limit


@dataclass(frozen=True, slots=True, kw_only=True)
class KeyCap:
    """One key's limits in an admission: the caller's key, or one of its ancestors."""

    key_id: uuid.UUID
    rpm: int | None  # requests per minute (None: no limit)
    daily: int | None  # tokens per UTC day (None: no cap)
    cost: float | None = None  # USD per UTC day (None: no cap)
    streams: int | None = None  # concurrent streams of the key and its descendants (None: no cap)
    budgets: Budgets | None = None  # its month and lifetime budgets

    @property
    def limited(self) -> bool:
        return (self.rpm is not None or self.daily is not None or self.cost is not None or self.streams is not None
                or self.budgets is not None)


@dataclass(frozen=True, slots=True, kw_only=True)
class Budgets:
    """A user's or a key's budgets by UTC month and for life (None: no such budget)."""

    monthly: int | None = None  # tokens
    monthly_cost: float | None = None  # USD
    total: int | None = None
    total_cost: float | None = None

    @staticmethod
    def of(monthly: int | None, monthly_cost: float | None, total: int | None,
           total_cost: float | None) -> Budgets | None:
        """The budgets, or None when there is none."""
        if monthly is None and monthly_cost is None and total is None and total_cost is None:
            return None
        return Budgets(monthly=monthly, monthly_cost=monthly_cost, total=total, total_cost=total_cost)

    @property
    def tokens(self) -> bool:
        return self.monthly is not None or self.total is not None

    @property
    def costs(self) -> bool:
        return self.monthly_cost is not None or self.total_cost is not None

    def only(self, *, tokens: bool, cost: bool) -> Budgets | None:
        """These budgets restricted to a kind (a top-up reserves only the kind it fell short of)."""
        return Budgets.of(self.monthly if tokens else None, self.monthly_cost if cost else None,
                          self.total if tokens else None, self.total_cost if cost else None)


@dataclass(frozen=True, slots=True, kw_only=True)
class Grant:
    """What one admission got: tokens and USD reserved (each cap of a kind the same), and its lease."""

    tokens: int
    cost: float
    lease: uuid.UUID | None


async def admit(pool: asyncpg.Pool, *, user_id: uuid.UUID, keys: Sequence[KeyCap], day: date, window: datetime,
                user_rpm: int | None, want: int, user_cap: int | None, share: int) -> int:
    """Take one slot in each per-minute window and reserve up to `want` tokens against each daily
    cap (a None limit is skipped), the user's and those of `keys` (the caller's key first, then
    its ancestors, root last); returns the tokens reserved (`want` when no cap applies). Every
    capped key reserves the same amount, the one returned."""
    grant = await admit_full(pool, user_id=user_id, keys=keys, day=day, window=window, user_rpm=user_rpm,
                             want=want, user_cap=user_cap, share=share)
    return grant.tokens


async def budget_use(pool: asyncpg.Pool, subjects: Sequence[str],
                     month: str) -> dict[tuple[str, str], tuple[int, int, float, float]]:
    """The month and lifetime rows of `subjects` ('u:<user>', 'k:<key>'): (subject, period) ->
    (tokens, reserved, cost_usd, cost_reserved); a row not there yet has nothing spent."""
    rows = await pool.fetch("SELECT subject, period, tokens, reserved, cost_usd::float8 AS cost, "
                            "cost_reserved::float8 AS cost_reserved FROM budget_usage "
                            "WHERE subject = ANY($1::text[]) AND period IN ($2, 'total')", list(subjects), month)
    return {(r["subject"], r["period"]): (r["tokens"], r["reserved"], r["cost"], r["cost_reserved"]) for r in rows}


def month_of(day: date) -> str:
    """The budget period of a day's UTC month ('YYYY-MM', as budget_usage.period)."""
    return f"{day.year:04d}-{day.month:02d}"


def _usd(value: float | None) -> Decimal | None:
    # exact for the database: the float's shortest repr, which is what a JSON settlement carries back
    return None if value is None else Decimal(repr(value))


async def admit_full(pool: asyncpg.Pool, *, user_id: uuid.UUID, keys: Sequence[KeyCap], day: date,
                     window: datetime, user_rpm: int | None, want: int, user_cap: int | None, share: int,
                     want_cost: float = 0.0, user_cost_cap: float | None = None, lease: uuid.UUID | None = None,
                     instance_id: uuid.UUID | None = None, user_streams: int | None = None,
                     user_budgets: Budgets | None = None) -> Grant:
    """`admit`, plus daily cost caps (reserving up to `want_cost` USD against the user's and each
    key's cap; a free request, want_cost 0, is never refused by them) and concurrency caps (one
    stream counted against the user's and each key's cap, held by the lease `lease` on
    `instance_id` until released). One call to gateway_admit_full (sql/0010): all or nothing.
    With month or lifetime budgets (`user_budgets`, a key's `budgets`) the one call is
    gateway_admit_budget (sql/0018) instead, which reserves the same amounts on those too."""
    args: list[object] = [
        user_id, [k.key_id for k in keys], day, window, user_rpm, [k.rpm for k in keys], want, user_cap,
        [k.daily for k in keys], share, _usd(want_cost), _usd(user_cost_cap), [_usd(k.cost) for k in keys],
        lease, instance_id, user_streams, [k.streams for k in keys]]
    if user_budgets is None and all(k.budgets is None for k in keys):
        sql = ("SELECT granted, granted_cost::float8 AS cost FROM gateway_admit_full("
               "$1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)")
    else:
        none = Budgets()
        u = user_budgets or none
        kb = [k.budgets or none for k in keys]
        args += [month_of(day), u.monthly, u.total, _usd(u.monthly_cost), _usd(u.total_cost), [b.monthly for b in kb],
                 [b.total for b in kb], [_usd(b.monthly_cost) for b in kb], [_usd(b.total_cost) for b in kb]]
        sql = ("SELECT granted, granted_cost::float8 AS cost FROM gateway_admit_budget("
               + ", ".join(f"${i}" for i in range(1, 27)) + ")")
    try:
        row = await pool.fetchrow(sql, *args)
    except asyncpg.PostgresError as e:
        limit = SQLSTATES.get(getattr(e, "sqlstate", None) or "")
        if limit is None:
            raise
        raise LimitReached(limit) from None
    # a lease is taken only when some cap counts streams: say so only if it exists
    taken = lease is not None and (user_streams is not None or any(k.streams is not None for k in keys))
    return Grant(tokens=row["granted"], cost=row["cost"], lease=lease if taken else None)


async def user_day_committed_both(pool: asyncpg.Pool, user_id: uuid.UUID, day: date) -> tuple[int, float]:
    """The user's tokens and dollars for `day`: spent plus reserved by replies still running."""
    row = await pool.fetchrow("SELECT tokens + reserved AS tokens, (cost_usd + cost_reserved)::float8 AS cost "
                              "FROM daily_usage WHERE user_id = $1 AND day = $2", user_id, day)
    return (row["tokens"], row["cost"]) if row is not None else (0, 0.0)


async def key_days_committed(pool: asyncpg.Pool, keys: Sequence[uuid.UUID], day: date) -> list[int]:
    """Each key's tokens for `day` (its subtree's), spent plus reserved, in `keys` order."""
    rows = await pool.fetch(
        "SELECT coalesce(d.tokens + d.reserved, 0) AS used FROM unnest($1::uuid[]) WITH ORDINALITY AS k (id, pos) "
        "LEFT JOIN key_daily_usage d ON d.api_key_id = k.id AND d.day = $2 ORDER BY k.pos", list(keys), day)
    return [row["used"] for row in rows]


# The keys that hold a request's key reservation: its key and each ancestor with a daily cap (the
# same rule as the settlement in store/usage.py). Locked leaf first, then released: the order
# gateway_admit_chain locks them in, so a release never deadlocks with an admission. $3 is the
# tokens to release on keys with a token cap, $4 the USD on keys with a cost cap.
_RELEASE_KEYS = """
WITH chain AS (
    SELECT c.id, c.pos FROM api_keys k, unnest(k.id || k.ancestors) WITH ORDINALITY AS c (id, pos)
    WHERE k.id = $1
),
held AS (
    SELECT d.api_key_id, m.limits ->> 'daily_tokens' IS NOT NULL AS tokens,
           m.limits ->> 'daily_cost_usd' IS NOT NULL AS cost
    FROM key_daily_usage d JOIN chain ON chain.id = d.api_key_id
    JOIN api_keys m ON m.id = d.api_key_id
    WHERE d.day = $2 AND (m.limits ->> 'daily_tokens' IS NOT NULL OR m.limits ->> 'daily_cost_usd' IS NOT NULL)
    ORDER BY chain.pos FOR UPDATE OF d
)
UPDATE key_daily_usage d SET reserved = CASE WHEN held.tokens THEN greatest(d.reserved - $3, 0) ELSE d.reserved END,
    cost_reserved = CASE WHEN held.cost THEN greatest(d.cost_reserved - $4, 0) ELSE d.cost_reserved END
FROM held WHERE d.api_key_id = held.api_key_id AND d.day = $2"""


# The month and lifetime rows that hold a request's reservation (sql/0018): those of its key and
# each ancestor whose limits name that budget (the same rule as the settlement), then the user's
# (a user row without a budget holds no reservation, so taking off it, floored at 0, changes
# nothing). Locked in admission's order: keys leaf first, month before total, the user last.
_RELEASE_BUDGETS = """
WITH chain AS (
    SELECT c.id, c.pos FROM api_keys k, unnest(k.id || k.ancestors) WITH ORDINALITY AS c (id, pos)
    WHERE k.id = $2
),
wanted AS (
    SELECT 'k:' || chain.id AS subject, p.period, chain.pos AS ord, p.w,
           CASE WHEN m.limits ->> p.tkey IS NOT NULL THEN $4::bigint ELSE 0 END AS t,
           CASE WHEN m.limits ->> p.ckey IS NOT NULL THEN $5::numeric ELSE 0 END AS c
    FROM chain JOIN api_keys m ON m.id = chain.id
    CROSS JOIN (VALUES ($3::text, 'monthly_tokens', 'monthly_cost_usd', 0),
                       ('total', 'total_tokens', 'total_cost_usd', 1)) AS p (period, tkey, ckey, w)
    UNION ALL
    SELECT 'u:' || $1::uuid, p.period, 2147483647, p.w, $6::bigint, $7::numeric
    FROM (VALUES ($3::text, 0), ('total', 1)) AS p (period, w)
),
locked AS (
    SELECT b.subject, b.period FROM budget_usage b JOIN wanted x USING (subject, period)
    WHERE x.t > 0 OR x.c > 0 ORDER BY x.ord, x.w FOR UPDATE OF b
)
UPDATE budget_usage b SET reserved = greatest(b.reserved - x.t, 0), cost_reserved = greatest(b.cost_reserved - x.c, 0)
FROM wanted x WHERE b.subject = x.subject AND b.period = x.period AND (x.t > 0 OR x.c > 0)
  AND (SELECT count(*) FROM locked) >= 0"""


async def release(pool: asyncpg.Pool, *, user_id: uuid.UUID, api_key_id: uuid.UUID | None, day: date,
                  user_tokens: int, key_tokens: int, user_cost: float = 0.0, key_cost: float = 0.0,
                  lease: uuid.UUID | None = None, quota: uuid.UUID | None = None) -> None:
    """Hand back what a request that never ran holds: its lease (first: admission takes stream
    counters before day rows), then the user's reservations and those of its key and of each
    ancestor that has a daily cap (all in one transaction, keys before the user, as admitted).
    `quota`: the slice the reservations came from, whose row says what it still holds: that row is
    locked first and only what it still holds is released (taken off it), never more
    (gateway_take_from_slice, sql/0016_slice_release.sql)."""
    if not (user_tokens or user_cost or key_tokens or key_cost or lease):
        return
    user_usd, key_usd = _usd(user_cost), _usd(key_cost)
    async with pool.acquire() as conn, conn.transaction():
        if quota is not None and (user_tokens or user_cost or key_tokens or key_cost):
            row = await conn.fetchrow("SELECT * FROM gateway_take_from_slice($1, $2, $3, $4, $5)", quota,
                                      user_tokens, key_tokens, user_usd, key_usd)
            user_tokens, key_tokens, user_usd, key_usd = (
                row["user_tokens"], row["key_tokens"], row["user_cost"], row["key_cost"])
        if lease is not None:
            await conn.execute("SELECT gateway_release_leases($1)", [lease])
        if (key_tokens or key_usd) and api_key_id is not None:
            await conn.execute(_RELEASE_KEYS, api_key_id, day, key_tokens, key_usd)
        if user_tokens or user_usd:
            await conn.execute("UPDATE daily_usage SET reserved = greatest(reserved - $3, 0), "
                               "cost_reserved = greatest(cost_reserved - $4, 0) "
                               "WHERE user_id = $1 AND day = $2", user_id, day, user_tokens, user_usd)
        if user_tokens or user_usd or key_tokens or key_usd:
            await conn.execute(_RELEASE_BUDGETS, user_id, api_key_id, month_of(day), key_tokens, key_usd or 0,
                               user_tokens, user_usd or 0)


async def release_instance(conn: asyncpg.Connection, instance_id: uuid.UUID) -> int:
    """Give back every lease a dead instance held (the sweep); returns how many."""
    released: int = await conn.fetchval(
        "SELECT gateway_release_leases(array_agg(id)) FROM stream_leases WHERE instance_id = $1", instance_id)
    return released


async def lease_owners(pool: asyncpg.Pool, exclude: uuid.UUID) -> list[uuid.UUID]:
    """The instances, other than `exclude`, that hold stream leases."""
    rows = await pool.fetch("SELECT DISTINCT instance_id FROM stream_leases WHERE instance_id <> $1", exclude)
    return [row["instance_id"] for row in rows]


# a window is read only in its own minute: older ones are kept a little, for people reading the table
WINDOW_KEEP = timedelta(minutes=5)


async def sweep_windows(pool: asyncpg.Pool, now: datetime) -> int:
    """Delete the per-minute windows older than WINDOW_KEEP; returns how many."""
    status = await pool.execute("DELETE FROM rate_windows WHERE window_start < $1", now - WINDOW_KEEP)
    return int(status.rpartition(" ")[2])


async def headroom(pool: asyncpg.Pool, *, subjects: Sequence[str], window: datetime, user_id: uuid.UUID,
                   day: date, keys: Sequence[uuid.UUID]) -> tuple[list[int], int, list[int]]:
    """What is taken now: requests in each subject's current window ('u:<user>' / 'k:<key>'), the
    user's tokens today (spent + reserved) and each key's. For the rate-limit headers of a request
    just admitted (api/openai/ratelimits.py); read-only."""
    row = await pool.fetchrow("""
        SELECT ARRAY(SELECT coalesce((SELECT w.count FROM rate_windows w
                                      WHERE w.subject = s.subject AND w.window_start = $2), 0)
                     FROM unnest($1::text[]) WITH ORDINALITY AS s (subject, pos) ORDER BY s.pos) AS windows,
               coalesce((SELECT tokens + reserved FROM daily_usage WHERE user_id = $3 AND day = $4), 0) AS user_day,
               ARRAY(SELECT coalesce((SELECT d.tokens + d.reserved FROM key_daily_usage d
                                      WHERE d.api_key_id = k.id AND d.day = $4), 0)
                     FROM unnest($5::uuid[]) WITH ORDINALITY AS k (id, pos) ORDER BY k.pos) AS key_days""",
        list(subjects), window, user_id, day, list(keys))
    return list(row["windows"]), int(row["user_day"]), [int(v) for v in row["key_days"]]


# -- quota leases (sql/0013_quota_leases.sql, gateway/policy/quota.py) ---------------------------------------------


class NoSlice(Exception):
    """gateway_lease_quota found too little left under some limit for even one request: nothing taken."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SliceGrant:
    """What one lease statement granted: window slots (None: no window limit applies), tokens and USD
    (0: no cap of that kind applies) and stream leases made ahead."""

    requests: int | None
    tokens: int
    cost: float
    streams: list[uuid.UUID]
    # what the limits looked at hold right after the grant (the rate-limit headers' numbers): each
    # window's count (Ask.subjects order), the user's tokens + reserved today (None: no user token
    # cap), each key's (keys order; None where the key has no token cap)
    windows: list[int] = field(default_factory=list)
    user_day: int | None = None
    key_days: list[int | None] = field(default_factory=list)


async def lease_quota(pool: asyncpg.Pool, *, lease: uuid.UUID, instance_id: uuid.UUID, user_id: uuid.UUID,
                      api_key_id: uuid.UUID | None, keys: Sequence[KeyCap], day: date, window: datetime,
                      user_rpm: int | None, requests: int | None, want: int, least: int, user_cap: int | None,
                      want_cost: float, least_cost: float, user_cost_cap: float | None, user_streams: int | None,
                      streams: int) -> SliceGrant:
    """Take (or add to) the slice `lease` of the caller's quota: one call to gateway_lease_quota."""
    try:
        row = await pool.fetchrow(
            "SELECT g_requests, g_tokens, g_cost::float8 AS g_cost, g_streams, g_windows, g_user_day, g_key_days"
            " FROM gateway_lease_quota("
            "$1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21)",
            lease, instance_id, user_id, api_key_id, [k.key_id for k in keys], day, window, user_rpm,
            [k.rpm for k in keys], requests, want, least, user_cap, [k.daily for k in keys], _usd(want_cost),
            _usd(least_cost), _usd(user_cost_cap), [_usd(k.cost) for k in keys], user_streams,
            [k.streams for k in keys], streams)
    except asyncpg.PostgresError as e:
        if getattr(e, "sqlstate", None) == "GW4L0":
            raise NoSlice from None
        raise
    return SliceGrant(requests=row["g_requests"], tokens=row["g_tokens"], cost=row["g_cost"],
                      streams=list(row["g_streams"]), windows=list(row["g_windows"]), user_day=row["g_user_day"],
                      key_days=list(row["g_key_days"]))


async def return_quota(pool: asyncpg.Pool, *, lease: uuid.UUID, tokens: int, cost: float, window: datetime | None,
                       subjects: Sequence[str], requests: int, streams: Sequence[uuid.UUID]) -> None:
    """Give back a slice's unused part (gateway_return_quota): tokens and USD off the day rows that hold
    them, window slots of `window` off `subjects`, the stream leases made ahead."""
    await pool.execute("SELECT gateway_return_quota($1, $2, $3, $4, $5, $6, $7)", lease, tokens, _usd(cost),
                       window, list(subjects), requests, list(streams))


async def reclaim_quota(conn: asyncpg.Connection, instance_id: uuid.UUID) -> int:
    """Release everything a dead instance's slices still hold (the sweep); returns how many slices."""
    n: int = await conn.fetchval("SELECT gateway_reclaim_quota($1)", instance_id)
    return n


async def quota_owners(pool: asyncpg.Pool, exclude: uuid.UUID) -> list[uuid.UUID]:
    """The instances, other than `exclude`, that hold quota slices."""
    rows = await pool.fetch("SELECT DISTINCT instance_id FROM quota_leases WHERE instance_id <> $1", exclude)
    return [row["instance_id"] for row in rows]


QUOTA_RECALL_CHANNEL = "gateway_quota_recall"


async def open_slices_elsewhere(pool: asyncpg.Pool, user_id: uuid.UUID, instance_id: uuid.UUID) -> bool:
    """Whether another instance holds a slice of the user's quota it has not given back."""
    found: bool = await pool.fetchval("SELECT EXISTS (SELECT 1 FROM quota_leases WHERE user_id = $1 AND open "
                                      "AND instance_id <> $2)", user_id, instance_id)
    return found


async def recall_quota(pool: asyncpg.Pool, user_id: uuid.UUID, calm_s: float) -> None:
    """Ask every instance to give back its slices of the user's quota (they LISTEN on the channel); no
    instance leases the user a slice for `calm_s` (quota_recalls)."""
    await pool.execute(
        "WITH r AS (INSERT INTO quota_recalls (user_id, until) "
        "VALUES ($1, clock_timestamp() + $3 * interval '1 second') "
        "ON CONFLICT (user_id) DO UPDATE SET until = EXCLUDED.until RETURNING user_id) "
        "SELECT pg_notify($2, user_id::text) FROM r", user_id, QUOTA_RECALL_CHANNEL, calm_s)
