"""The operator's commands beside `serve`: keys list / revoke, users erase, usage (and its export),
webhooks, leaderboard, printed as tables.

They talk to the database directly (the same one the gateway uses: DATABASE_URL, or the embedded
server under the data directory), so they work with the gateway stopped, and see every user.
"""

from __future__ import annotations

import argparse
import asyncio
import uuid
from collections.abc import Awaitable, Callable, Sequence
from contextlib import aclosing
from datetime import date, datetime, timedelta
from typing import Any, BinaryIO, TypeVar

from gateway.config import Settings, WebhookConfig
from gateway.policy.admission import utc_now
from gateway.service import erasure
from gateway.service.leaderboard import PROVISIONAL_BELOW, leaderboard
from gateway.store import keys as keys_store
from gateway.store import usage as usage_store
from gateway.store.db import Database, migrate, open_database
from gateway.store.erasure import AuditEntry
from gateway.store.leaderboard import battles
from gateway.webhooks import outbox

T = TypeVar("T")


def days(raw: str) -> int:
    """`--days`: 1 to 366, the range /api/usage allows."""
    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of days: {raw!r}") from None
    if not 1 <= value <= 366:
        raise argparse.ArgumentTypeError(f"must be 1 to 366, got {value}")
    return value


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table: a header, a rule, one line per row; numbers right-aligned."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    numeric = [bool(rows) and all(isinstance(r[i], int | float) for r in rows) for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w)
                         for v, w, num in zip(values, widths, numeric, strict=True)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M")
    if isinstance(value, float):
        return f"{value:.4f}".rstrip("0").rstrip(".") if value != int(value) or abs(value) < 1 else f"{value:.0f}"
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value)


async def with_database(settings: Settings, work: Callable[[Database], Awaitable[T]]) -> T:
    db = await open_database(settings)
    try:
        async with db.session() as conn:  # the migration lock is a session lock
            await migrate(conn)
        return await work(db)
    finally:
        await db.close()


def run(settings: Settings, work: Callable[[Database], Awaitable[T]]) -> T:
    return asyncio.run(with_database(settings, work))


async def keys_list(db: Database, user_id: uuid.UUID | None) -> str:
    rows = await keys_store.list_keys(db.pool, user_id)
    spend = await usage_store.key_spend(db.pool, [r["id"] for r in rows], user_id, utc_now().date())

    def spent(key_id: uuid.UUID, period: str) -> str:
        got = spend.get(key_id, {}).get(period, {"tokens": 0, "cost_usd": 0.0})
        return f"{got['tokens']} / ${got['cost_usd']:.2f}"

    return table(["id", "prefix", "name", "user", "scopes", "created", "last used", "revoked", "today", "month",
                  "total"],
                 [[r["id"], r["prefix"], r["name"], r["user_id"], r["scopes"], r["created_at"], r["last_used_at"],
                   r["revoked_at"], spent(r["id"], "today"), spent(r["id"], "month"), spent(r["id"], "total")]
                  for r in rows]) + f"\n{len(rows)} key(s); spend in tokens / USD, a key's including its descendants'"


async def keys_create(db: Database, webhooks: Sequence[WebhookConfig], name: str, scopes: list[str],
                      user_id: uuid.UUID | None) -> str:
    """A new root key (of a new user unless `user_id`); the plaintext key. `key.created` is queued
    for the endpoints subscribed to it in the same transaction."""
    async with db.pool.acquire() as conn, conn.transaction():
        owner = user_id or uuid.uuid4()
        await keys_store.upsert_user(conn, owner, None)
        row, key = await keys_store.issue_key(conn, owner, name, scopes)
        await outbox.enqueue(conn, webhooks, [outbox.key_created(row, None)])
    return key


async def keys_revoke(db: Database, ref: str, webhooks: Sequence[WebhookConfig] = ()) -> tuple[int, str]:
    """(exit status, message): revokes the key whose id, prefix or name is `ref`, and the keys issued
    under it, on every instance within a second (`key.revoked` queued in the same transaction for
    the endpoints subscribed to it). A name several keys share picks the one not yet revoked; when
    that is still more than one, nothing is revoked and they are listed."""
    found = await keys_store.find_keys(db.pool, ref)
    if len(found) > 1:
        found = [r for r in found if r["revoked_at"] is None] or found
    if not found:
        return 1, f"no key with the id, prefix or name {ref!r}"
    if len(found) > 1:
        return 1, (f"{len(found)} keys match {ref!r}; revoke one by its id:\n"
                   + table(["id", "prefix", "name", "user", "created"],
                           [[r["id"], r["prefix"], r["name"], r["user_id"], r["created_at"]] for r in found]))
    key = found[0]
    revoked = await keys_store.revoke_key(
        db.pool, key["id"], None,
        lambda conn, hashes: outbox.enqueue(conn, webhooks, [outbox.key_revoked(key["id"], len(hashes))]))
    if revoked is None:
        return 1, f"no key {key['id']}"
    return 0, (f"revoked {key['id']}"
               + (f" and {len(revoked) - 1} key(s) issued under it" if len(revoked) > 1 else ""))


async def users_erase(db: Database, settings: Settings, user_id: uuid.UUID) -> tuple[int, str]:
    """(exit status, message): erases the user (gateway/service/erasure.py); with REDIS_URL, their
    reply streams too. The audit entry's actor is the nil UUID: the operator, not a user."""
    link = None
    if settings.redis_url is not None:
        from gateway.fleet.link import RedisLink

        link = RedisLink(settings.redis_url.reveal())
    audit = AuditEntry(at=utc_now(), actor=uuid.UUID(int=0), api_key_id=None, method="CLI",
                       path=f"users erase {user_id}")
    try:
        done = await erasure.erase_user(db.pool, user_id, link=link, audit=audit)
    finally:
        if link is not None:
            await link.close()
    if done is None:
        return 1, f"no user {user_id}"
    counts = ", ".join(f"{n} {name.replace('_', ' ')}" for name, n in done.erased.as_dict().items())
    streams = "redis unavailable: streams expire by themselves" if done.redis_streams is None else (
        f"{done.redis_streams} redis streams")
    return 0, f"erased user {user_id}: {counts}; {done.keys_revoked} keys revoked; {streams}"


async def usage(db: Database, days: int, by: str, user_id: uuid.UUID | None) -> str:
    today = utc_now().date()
    start = today - timedelta(days=days - 1)
    rows = await usage_store.usage_report(db.pool, user_id, start, today, by)
    body: list[list[Any]] = [[r[by], r["requests"], r["prompt_tokens"], r["completion_tokens"], r["total_tokens"],
                              round(r["cost_usd"], 6)] for r in rows]
    totals = ["total", *(sum(r[i] for r in body) for i in range(1, 5)), round(sum(r[5] for r in body), 6)]
    return (f"usage {start} .. {today} (UTC), {'every user' if user_id is None else f'user {user_id}'}\n"
            + table([by, "requests", "prompt", "completion", "total tokens", "cost usd"], [*body, totals]))


def day(raw: str) -> date:
    """`--from` / `--to`: a UTC day, YYYY-MM-DD."""
    try:
        return date.fromisoformat(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD): {raw!r}") from None


async def usage_export(db: Database, start: date | None, end: date | None, fmt: str, user_id: uuid.UUID | None,
                       out: BinaryIO) -> tuple[int, str]:
    """Every reply's usage in [start, end] (default: the last 30 days) written to `out` as CSV or
    NDJSON, one line per reply; (exit status, a message for stderr when it fails)."""
    end = end or utc_now().date()
    start = start or end - timedelta(days=29)
    if start > end:
        return 2, "--from must not be after --to"
    first = True
    async with aclosing(usage_store.export_usage(db.pool, user_id, start, end, hide_pending=False)) as batches:
        async for batch in batches:
            out.write(usage_store.export_lines([dict(r) for r in batch], fmt, header=first))
            first = False
    if first:
        out.write(usage_store.export_lines([], fmt, header=True))
    out.flush()
    return 0, ""


async def webhooks_list(db: Database, dead_only: bool) -> str:
    """The newest webhook deliveries (dead letters only with `dead_only`)."""
    rows = await outbox.listing(db.pool, dead_only=dead_only)
    return table(["id", "event", "endpoint", "status", "attempts", "created", "last error"],
                 [[r["id"], r["event"], r["endpoint"], r["status"], r["attempts"], r["created_at"], r["last_error"]]
                  for r in rows]) + f"\n{len(rows)} {'dead letter(s)' if dead_only else 'delivery(ies)'}"


async def webhooks_redeliver(db: Database, msg_id: str) -> tuple[int, str]:
    if await outbox.redeliver(db.pool, msg_id):
        return 0, f"{msg_id} will be delivered again"
    return 1, f"no dead letter {msg_id}"


async def leaderboard_table(db: Database, include_named: bool, rounds: int) -> str:
    found = await battles(db.pool, include_named)
    entries = leaderboard(found, rounds)
    rows = [[i, e.model + (" (provisional)" if e.provisional else ""), e.rating, f"{e.ci_low:.0f} - {e.ci_high:.0f}",
             e.rating_lc, e.battles, f"{e.win_rate:.0%}"] for i, e in enumerate(entries, 1)]
    note = (f"{len(found)} battle(s), {'all' if include_named else 'anonymous'} comparisons; 95% intervals; "
            f"provisional: fewer than {PROVISIONAL_BELOW} battles")
    return table(["#", "model", "rating", "95% CI", "length-controlled", "battles", "win rate"], rows) + "\n" + note
