"""The Redis connection of one instance, and what it last saw of Redis (for /readyz and the logs).

Commands fail fast while Redis is away (no client-side retries, a short connect timeout): every
caller has a fallback (the publisher retries later from the reply's own event log; readers follow
the database), and a retry loop inside the client would only delay that fallback.

A Redis Cluster is recognised from `REDIS_URL` alone, naming any one of its nodes: the first time
Redis answers, the link asks that node (`INFO cluster`); when it reports `cluster_enabled`, the
link switches to the cluster client, which finds the other nodes and routes each command to the
node holding its key's slot. Every key of one reply shares a slot (gateway/fleet/wire.py), so a
reply's pipeline never spans nodes. While part of the cluster is down (CLUSTERDOWN, TRYAGAIN, a
node that does not answer), Redis counts as away, as a lost single server would.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ClusterDownError, ClusterError, RedisClusterException, RedisError, TryAgainError

log = logging.getLogger(__name__)

# what a Redis command can raise when Redis is away, restarting, or cut off mid-reply
REDIS_DOWN = (RedisError, RedisClusterException, OSError, TimeoutError)
# among those, the replies of a cluster that cannot serve a slot now (a pipeline returns them in its
# results): Redis is away, not refusing one command
CLUSTER_DOWN = (ClusterDownError, TryAgainError, ClusterError, RedisClusterException)


class RedisLink:
    DOWN = REDIS_DOWN  # for modules that must not import redis themselves (it is an optional extra)

    def __init__(self, url: str, *, block_ms: int = 1000) -> None:
        self.block_ms = block_ms
        self._url = url
        # the socket timeout is longer than any XREAD BLOCK, so a blocked read is never taken for a dead one
        self._socket_timeout = block_ms / 1000 + 4
        self.client: Any = aioredis.Redis.from_url(url, retry=Retry(NoBackoff(), 0), max_connections=None,
                                                   socket_connect_timeout=1.0, socket_timeout=self._socket_timeout)
        self.cluster: bool | None = None  # None until the node has said whether it is part of a cluster
        self._asking = asyncio.Lock()
        self.down_since: float | None = None
        self.last_error: str | None = None

    async def ready(self) -> Any:
        """The client to send commands with (`redis.asyncio.Redis` or `RedisCluster`: the same
        commands). The first call that reaches Redis asks the node whether it belongs to a cluster;
        raises what a command raises while Redis is away (REDIS_DOWN), and asks again next time."""
        if self.cluster is not None:
            return self.client
        async with self._asking:
            if self.cluster is None:
                info = await self.client.info("cluster")
                if int(info.get("cluster_enabled") or 0):
                    cluster = RedisCluster.from_url(self._url, retry=Retry(NoBackoff(), 0), max_connections=1 << 20,
                                                    socket_connect_timeout=1.0, socket_timeout=self._socket_timeout)
                    await cluster.initialize()
                    single, self.client = self.client, cluster
                    await single.aclose()
                    log.info("redis is a cluster of %d nodes", len(cluster.get_nodes()))
                self.cluster = bool(int(info.get("cluster_enabled") or 0))
        return self.client

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
                client = await self.ready()
                if self.cluster:  # every master: a cluster with one away cannot serve its slots
                    await client.ping(target_nodes=RedisCluster.PRIMARIES)
                else:
                    await client.ping()
        except REDIS_DOWN as e:
            self.failed(e)
            return False
        self.worked()
        return True

    async def close(self) -> None:
        await self.client.aclose()
