"""Erasing a user, for the admin API and the command line.

In order: every key of the user (and every key issued under them) is revoked, and each instance
drops them from its cache within a second; the user's live replies are cancelled wherever they
run, and get `SETTLE_S` to end; every row that names the user is deleted in one transaction
(gateway/store/erasure.py), their usage folded into totals naming nobody; after `GRACE_S`, a
second pass removes what requests in flight at that moment wrote since; last, the replies'
streams are deleted from Redis (were Redis away, they expire by themselves within
REDIS_STREAM_TTL_S).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import asyncpg

from gateway.fleet.wire import stream_key
from gateway.store import erasure as store
from gateway.store.erasure import AuditEntry, Erased
from gateway.store.instances import notify_cancel

if TYPE_CHECKING:  # redis is an optional extra
    from gateway.fleet.link import RedisLink

log = logging.getLogger(__name__)

SETTLE_S = 10.0  # how long the user's cancelled live replies get to end
GRACE_S = 1.0  # then what requests in flight wrote meanwhile is removed by a second pass


@dataclass(frozen=True)
class Erasure:
    erased: Erased
    keys_revoked: int
    redis_streams: int | None  # deleted; None when Redis was away (they expire by themselves)


async def erase_user(pool: asyncpg.Pool, user_id: uuid.UUID, *, link: RedisLink | None,
                     audit: AuditEntry | None = None, forget_key: Callable[[bytes], None] | None = None,
                     settle_s: float = SETTLE_S, grace_s: float = GRACE_S) -> Erasure | None:
    """Erase the user (see the module's docstring); None when nothing named them."""
    hashes = await store.revoke_keys(pool, user_id)
    if forget_key is not None:
        for key_hash in hashes:  # here at once; the other instances hear the notifications
            forget_key(key_hash)
    live = await store.live_replies(pool, user_id)
    for message_id in live:
        await notify_cancel(pool, message_id)  # every instance listens, this one too
    deadline = time.monotonic() + settle_s
    while live and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        live = await store.live_replies(pool, user_id)
    if live:
        log.warning("erasing user %s: %d replies still live after %.0f s, deleted anyway", user_id, len(live),
                    settle_s)
    replies = await store.reply_ids(pool, user_id)
    async with pool.acquire() as conn:
        erased = await store.erase(conn, user_id, audit)
    if not erased.total and not hashes:
        return None
    await asyncio.sleep(grace_s)
    async with pool.acquire() as conn:
        erased += await store.erase(conn, user_id)
    return Erasure(erased, len(hashes), await drop_streams(link, replies))


async def drop_streams(link: RedisLink | None, replies: list[uuid.UUID]) -> int | None:
    """Delete the replies' streams; how many there were (None: Redis is away)."""
    if link is None or not replies:
        return 0
    try:
        client = await link.ready()
        pipe = client.pipeline(transaction=False)
        for message_id in replies:
            pipe.delete(stream_key(message_id))
        return sum(int(n) for n in await pipe.execute())
    except link.DOWN as e:
        link.failed(e)
        log.warning("erasure: redis unavailable (%s): the user's reply streams expire by themselves",
                    type(e).__name__)
        return None
