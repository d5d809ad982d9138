"""Seed a scratch database with many messages and time the hot queries and the retention prune.

    python bench/retention.py --messages 10000000 [--url postgresql://postgres@127.0.0.1:5432/postgres]

Creates the database `retention_bench` on that server, applies the migrations, seeds threads of 10
messages (a user message and its reply, five times) spread over 400 days of activity across 10,000
users, then times (p50/p99 over --samples runs each): the persist statement of a new turn in an
existing thread, the history read, the first page of the thread list, and retention's batch delete
of threads untouched for 365 days; with --partitions, the month-partitioned alternative (a fifth
of the messages copied into monthly partitions: a read by thread on both tables, one month
dropped). The database is dropped at the end (--keep leaves it, and a later run reuses it).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.store import messages, retention, threads
from gateway.store.db import create_pool, migrate

DB = "retention_bench"
USERS = 10_000
PER_THREAD = 10

_SEED = """
INSERT INTO messages (id, thread_id, user_id, role, content, status, reply_to, created_at, finished_at)
OVERRIDING SYSTEM VALUE
SELECT md5(t.n || '-' || k)::uuid, md5('t' || t.n)::uuid, md5('u' || (t.n % $3))::uuid,
       CASE WHEN k % 2 = 0 THEN 'user' ELSE 'assistant' END,
       repeat('word ', 40), 'complete',
       CASE WHEN k % 2 = 1 THEN md5(t.n || '-' || (k - 1))::uuid END,
       t.at + k * interval '1 minute', t.at + k * interval '1 minute'
FROM (SELECT n, now() - (n % 400) * interval '1 day' - (n % 1440) * interval '1 minute' AS at
      FROM generate_series($1::bigint, $2::bigint) n) t, generate_series(0, 9) k
"""


async def seed(conn: asyncpg.Connection, n_threads: int) -> None:
    await conn.execute("INSERT INTO users (id) SELECT md5('u' || n)::uuid FROM generate_series(0, $1 - 1) n", USERS)
    await conn.execute("""
        INSERT INTO threads (id, user_id, title, created_at, updated_at)
        SELECT md5('t' || n)::uuid, md5('u' || (n % $2))::uuid, 'thread ' || n, at, at + interval '10 minutes'
        FROM (SELECT n, now() - (n % 400) * interval '1 day' - (n % 1440) * interval '1 minute' AS at
              FROM generate_series(0, $1 - 1) n) t""", n_threads, USERS)
    # rows inserted in bulk: the foreign keys hold by construction, their per-row checks are skipped
    await conn.execute("SET session_replication_role = replica")
    step = 100_000
    for lo in range(0, n_threads, step):
        t0 = time.perf_counter()
        await conn.execute(_SEED, lo, min(lo + step, n_threads) - 1, USERS)
        print(f"seeded threads {lo}..{min(lo + step, n_threads) - 1} in {time.perf_counter() - t0:.1f} s",
              flush=True)
    await conn.execute("SET session_replication_role = DEFAULT")
    await conn.execute("ANALYZE")


def pct(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def report(name: str, samples: list[float]) -> None:
    print(f"{name:<28} n={len(samples):<4} p50={statistics.median(samples):7.2f} ms  "
          f"p99={pct(samples, 99):7.2f} ms  max={max(samples):7.2f} ms  load={os.getloadavg()[0]:.2f}", flush=True)


async def measure(pool: asyncpg.Pool, n_threads: int, samples: int, batch: int, batches: int) -> None:
    instance = uuid.uuid4()
    persist, history, listing = [], [], []
    for i in range(samples):
        n = (i * 7919) % n_threads
        user = uuid.UUID(await pool.fetchval("SELECT md5('u' || $1::text)", str(n % USERS)))
        thread = uuid.UUID(await pool.fetchval("SELECT md5('t' || $1::text)", str(n)))
        t0 = time.perf_counter()
        await messages.persist_turns(pool, [messages.TurnRequest(
            user_id=user, content="hello", client_message_id=None, thread_id=thread, instance_id=instance)])
        persist.append((time.perf_counter() - t0) * 1000)
        t0 = time.perf_counter()
        await messages.thread_history(pool, user, thread)
        history.append((time.perf_counter() - t0) * 1000)
        t0 = time.perf_counter()
        await threads.list_threads(pool, user, 20, None)
        listing.append((time.perf_counter() - t0) * 1000)
    report("persist (turn + history)", persist)
    report("history read", history)
    report("thread list (first page)", listing)
    prune, rows = [], 0
    for _ in range(batches):
        t0 = time.perf_counter()
        done = await retention.prune_batch(pool, 365, batch)
        prune.append((time.perf_counter() - t0) * 1000)
        rows += done
    report(f"prune batch of {batch} threads", prune)
    print(f"pruned {rows} threads ({rows * PER_THREAD} messages)")


# the alternative: messages partitioned by month of created_at, a month dropped at a time. A fifth
# of the threads (all their messages) is copied into such a table, one partition a month
_PARTITIONED = """
CREATE TABLE messages_p (LIKE messages INCLUDING DEFAULTS) PARTITION BY RANGE (created_at);
DO $$
DECLARE m date := date_trunc('month', now() - interval '420 days');
BEGIN
    WHILE m <= now() + interval '31 days' LOOP
        EXECUTE format('CREATE TABLE %I PARTITION OF messages_p FOR VALUES FROM (%L) TO (%L)',
                       'messages_p_' || to_char(m, 'YYYY_MM'), m, m + interval '1 month');
        m := m + interval '1 month';
    END LOOP;
END $$;
INSERT INTO messages_p SELECT * FROM messages WHERE abs(hashtext(thread_id::text)) % 5 = 0;
CREATE INDEX ON messages_p (thread_id, seq);
ANALYZE messages_p;
"""

_PROBE = "SELECT id, role, content FROM {table} WHERE thread_id = $1 ORDER BY seq DESC LIMIT 50"


async def partitions(pool: asyncpg.Pool, samples: int) -> None:
    t0 = time.perf_counter()
    await pool.execute(_PARTITIONED)
    rows = await pool.fetchval("SELECT count(*) FROM messages_p")
    parts = await pool.fetchval("SELECT count(*) FROM pg_inherits WHERE inhparent = 'messages_p'::regclass")
    print(f"partitioned copy: {rows} messages in {parts} monthly partitions, built in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    threads_p = [r[0] for r in await pool.fetch(
        "SELECT DISTINCT thread_id FROM messages_p WHERE created_at > now() - interval '300 days' LIMIT $1", samples)]
    for table in ("messages", "messages_p"):
        took = []
        for thread in threads_p:
            t0 = time.perf_counter()
            await pool.fetch(_PROBE.format(table=table), thread)
            took.append((time.perf_counter() - t0) * 1000)
        report(f"thread read on {table}", took)
    oldest = await pool.fetchval("SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                                 "WHERE i.inhparent = 'messages_p'::regclass ORDER BY c.relname LIMIT 1 OFFSET 1")
    size = await pool.fetchval(f"SELECT count(*) FROM {oldest}")
    t0 = time.perf_counter()
    await pool.execute(f"ALTER TABLE messages_p DETACH PARTITION {oldest}; DROP TABLE {oldest}")
    report(f"drop a month ({size} messages)", [(time.perf_counter() - t0) * 1000])
    await pool.execute("DROP TABLE messages_p")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--messages", type=int, default=10_000_000)
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--partitions", action="store_true", help="also time the month-partitioned alternative")
    parser.add_argument("--keep", action="store_true", help="keep the database (and reuse it when present)")
    args = parser.parse_args()
    n_threads = args.messages // PER_THREAD
    admin = await asyncpg.connect(args.url)
    exists = await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", DB)
    if not exists:
        await admin.execute(f"CREATE DATABASE {DB}")
    url = args.url.rsplit("/", 1)[0] + "/" + DB
    try:
        conn = await asyncpg.connect(url)
        await migrate(conn)
        if not exists:
            t0 = time.perf_counter()
            await seed(conn, n_threads)
            print(f"seeded {n_threads * PER_THREAD} messages in {time.perf_counter() - t0:.0f} s", flush=True)
        size = await conn.fetchval("SELECT pg_size_pretty(pg_total_relation_size('messages'))")
        print(f"messages: {await conn.fetchval('SELECT count(*) FROM messages')} rows, {size}", flush=True)
        await conn.close()
        pool = await create_pool(url, min_size=1, max_size=2)
        await measure(pool, n_threads, args.samples, args.batch, args.batches)
        if args.partitions:
            await partitions(pool, args.samples)
        await pool.close()
    finally:
        if not args.keep:
            await admin.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
        await admin.close()


if __name__ == "__main__":
    asyncio.run(main())
