"""The activity log: one row per authenticated request (who, what, when, from where), written by a
background writer that batches, retries with backoff, drains at shutdown and counts what it drops."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from aiohttp.test_utils import TestClient

from gateway.state import ACTIVITY
from gateway.store.activity import ActivityRecord, record_activity_many
from gateway.store.background import BatchWriter
from tests.support.common import MakeClient, User, wait_for

COLUMNS = "action, method, path, status, ip, request_id, api_key_id"


async def rows_of(db: asyncpg.Pool, user_id: uuid.UUID) -> list[dict[str, Any]]:
    rows = await db.fetch(f"SELECT {COLUMNS} FROM activity_log WHERE user_id = $1 ORDER BY at, id", user_id)
    return [dict(r) for r in rows]


async def key_id_of(db: asyncpg.Pool, user: User) -> uuid.UUID:
    return await db.fetchval("SELECT id FROM api_keys WHERE user_id = $1", user.id)


def row(action: str, method: str, path: str, status: int, request_id: str, key_id: uuid.UUID | None) -> dict[str, Any]:
    return {"action": action, "method": method, "path": path, "status": status, "ip": "127.0.0.1",
            "request_id": request_id, "api_key_id": key_id}


def sample(user_id: uuid.UUID, n: int) -> list[ActivityRecord]:
    at = datetime.now(UTC)
    return [ActivityRecord(at + timedelta(microseconds=i), user_id, None, "test.batch", "POST", f"/n/{i}", 200,
                           "10.0.0.1", f"req-{i}") for i in range(n)]


async def test_requests_are_logged_with_action_path_status_and_ip(client: TestClient, user: User,
                                                                 db: asyncpg.Pool):
    key_id = await key_id_of(db, user)
    rid = [f"act-{i}-{uuid.uuid4().hex[:8]}" for i in range(6)]

    def h(i: int) -> dict[str, str]:
        return {**user.headers, "X-Request-Id": rid[i]}

    resp = await client.post("/api/chat", json={"content": "hi"}, headers=h(0))
    assert resp.status == 202
    accepted = await resp.json()
    resp = await client.post("/api/keys", json={"name": "logged"}, headers=h(1))
    assert resp.status == 403  # a key without admin creates no keys; refused, but the caller is known
    resp = await client.get("/api/threads?limit=5&key=not-in-the-log", headers=h(2))
    assert resp.status == 200
    missing = uuid.uuid4()
    resp = await client.get(f"/api/threads/{missing}", headers=h(3))
    assert resp.status == 404
    resp = await client.get("/api/keys?all=true", headers=h(4))  # refused, but the caller is known
    assert resp.status == 403
    # an EventSource with its stream token: the user, no key, and the token stays out of the path
    resp = await client.get(accepted["stream_url"], headers={"X-Request-Id": rid[5]})
    assert resp.status == 200
    await resp.read()
    # nobody authenticated: nothing to attribute (the access log has it)
    resp = await client.get("/api/threads", headers={"Authorization": "Bearer gwk_nope"})
    assert resp.status == 401

    message_id = accepted["assistant_message_id"]
    expected = [
        row("chat.post_chat", "POST", "/api/chat", 202, rid[0], key_id),
        row("keys.create_key", "POST", "/api/keys", 403, rid[1], key_id),
        row("threads.list_threads", "GET", "/api/threads", 200, rid[2], key_id),
        row("threads.get_thread", "GET", f"/api/threads/{missing}", 404, rid[3], key_id),
        row("keys.list_keys", "GET", "/api/keys", 403, rid[4], key_id),
        row("chat.get_message_stream", "GET", f"/api/messages/{message_id}/stream", 200, rid[5], None),
    ]
    await wait_for(lambda: _count_is(db, user.id, len(expected)))
    assert await rows_of(db, user.id) == expected


async def _count_is(db: asyncpg.Pool, user_id: uuid.UUID, n: int) -> bool:
    return await db.fetchval("SELECT count(*) FROM activity_log WHERE user_id = $1", user_id) >= n


async def test_queued_activity_is_drained_when_the_app_shuts_down(make_client: MakeClient, user: User,
                                                                  db: asyncpg.Pool):
    client = await make_client()
    for _ in range(3):
        resp = await client.get("/api/threads", headers=user.headers)
        assert resp.status == 200
    writer = client.app[ACTIVITY]
    late = sample(user.id, 1)[0]._replace(action="test.late")
    writer.add(late)
    assert writer.depth >= 1  # certainly still queued: nothing ran since add()
    await client.close()
    rows = await rows_of(db, user.id)
    assert [r["action"] for r in rows] == ["threads.list_threads"] * 3 + ["test.late"]
    assert writer.dropped == 0


class FlakyDatabase:
    """A real flush to the real database that fails (as a dropped connection would) the first times."""

    def __init__(self, pool: asyncpg.Pool, failures: int) -> None:
        self.pool = pool
        self.failures = failures
        self.calls = 0

    async def flush(self, batch: list[ActivityRecord]) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise ConnectionResetError("database went away")
        await record_activity_many(self.pool, batch)


async def test_a_failed_flush_is_retried_and_each_row_written_once(db: asyncpg.Pool):
    user_id = uuid.uuid4()
    flaky = FlakyDatabase(db, failures=2)
    writer: BatchWriter[ActivityRecord] = BatchWriter("activity-test", flaky.flush, interval_s=0.01,
                                                      max_backoff_s=0.05)
    writer.start()
    records = sample(user_id, 5)
    for r in records:
        writer.add(r)
    await wait_for(lambda: _count_is(db, user_id, 5))
    await writer.close()
    assert flaky.calls == 3
    assert writer.written == 5 and writer.dropped == 0 and writer.depth == 0
    stored = await db.fetch("SELECT path, request_id FROM activity_log WHERE user_id = $1 ORDER BY at", user_id)
    assert [(r["path"], r["request_id"]) for r in stored] == [(r.path, r.request_id) for r in records]


async def test_a_full_queue_drops_and_counts_instead_of_growing(db: asyncpg.Pool):
    user_id = uuid.uuid4()
    writer: BatchWriter[ActivityRecord] = BatchWriter(
        "activity-test", lambda batch: record_activity_many(db, batch), max_queue=3)
    records = sample(user_id, 5)
    for r in records:  # not started yet: nothing drains, the bound is hit
        writer.add(r)
    assert writer.depth == 3 and writer.dropped == 2
    writer.start()
    await writer.close()
    assert writer.written == 3 and writer.depth == 0
    paths = [r["path"] for r in await db.fetch("SELECT path FROM activity_log WHERE user_id = $1 ORDER BY at",
                                               user_id)]
    assert paths == ["/n/0", "/n/1", "/n/2"]


async def test_a_backlog_is_flushed_in_batches_of_at_most_max_batch(db: asyncpg.Pool):
    user_id = uuid.uuid4()
    sizes: list[int] = []

    async def flush(batch: list[ActivityRecord]) -> None:
        sizes.append(len(batch))
        await record_activity_many(db, batch)

    writer: BatchWriter[ActivityRecord] = BatchWriter("activity-test", flush, max_batch=2)
    for r in sample(user_id, 5):
        writer.add(r)
    writer.start()
    await writer.close()
    assert sizes == [2, 2, 1]
    assert await db.fetchval("SELECT count(*) FROM activity_log WHERE user_id = $1", user_id) == 5
