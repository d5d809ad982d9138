"""The Redis connection of one instance, and what it last saw of Redis (for /readyz and the logs).

Commands fail fast while Redis is away (no client-side retries, a short connect timeout): every
caller has a fallback (the publisher retries later from the reply's own event log; readers follow
the database), and a retry loop inside the client would only delay that fallback.
"""

from __future__ import annotations

import asyncio
import logging
import time

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

# what a Redis command can raise when Redis is away, restarting, or cut off mid-reply
REDIS_DOWN = (RedisError, OSError, TimeoutError)


class RedisLink:
    DOWN = REDIS_DOWN  # for modules that must not import redis themselves (it is an optional extra)

    def __init__(self, url: str, *, block_ms: int = 1000) -> None:
        self.block_ms = block_ms
        # the socket timeout is longer than any XREAD BLOCK, so a blocked read is never taken for a dead one
        self.client: aioredis.Redis = aioredis.Redis.from_url(
            url, socket_connect_timeout=1.0, socket_timeout=block_ms / 1000 + 4, retry=Retry(NoBackoff(), 0),
            max_connections=None)
        self.down_since: float | None = None
        self.last_error: str | None = None

    @property
    def up(self) -> bool:
        return self.down_since is None

    def failed(self, error: BaseException) -> None:
        if self.down_since is None:
            self.down_since = time.monotonic()
            log.warning("redis unavailable (%s): live streams of other instances follow the database",
                        type(error).__name__)
        self.last_error = type(error).__name__

    def worked(self) -> None:
        if self.down_since is not None:
            log.info("redis is back after %.1f s", time.monotonic() - self.down_since)
            self.down_since = None

    async def ping(self) -> bool:
        try:
            async with asyncio.timeout(1):
                await self.client.ping()
        except REDIS_DOWN as e:
            self.failed(e)
            return False
        self.worked()
        return True

    async def close(self) -> None:
        await self.client.aclose()
