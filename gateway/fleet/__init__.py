"""The fleet: many instances of the gateway on one PostgreSQL, and Redis when `REDIS_URL` is set.

    instance.py   this process among its peers: liveness, the sweep of a dead peer's replies, cancel
    link.py       the Redis connection and its health (/readyz says "degraded" when it is away)
    wire.py       a reply's events as Redis Stream entries: one stream per message, entry id = seq
    publisher.py  the generating instance: every event batch of every live reply, XADDed off the hot path
    follow.py     any other instance: one reader task per (instance, message) fanning out to its listeners,
                  from Redis (XREAD BLOCK) or, without it, from the database (checkpoints, then the row)

PostgreSQL stays the system of record: nothing is kept only in Redis, so losing it degrades live
cross-instance streaming to the database's pace, never data.
"""

__all__ = [
    "follow",
    "instance",
    "link",
    "publisher",
    "wire",
]
