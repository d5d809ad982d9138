"""SQL for the activity log: rows arrive in batches from a background writer."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import NamedTuple

import asyncpg


class ActivityRecord(NamedTuple):
    at: datetime
    user_id: uuid.UUID
    api_key_id: uuid.UUID | None
    action: str
    method: str
    path: str
    status: int
    ip: str | None
    request_id: str | None


_INSERT = """
INSERT INTO activity_log (at, user_id, api_key_id, action, method, path, status, ip, request_id)
SELECT * FROM unnest($1::timestamptz[], $2::uuid[], $3::uuid[], $4::text[], $5::text[], $6::text[],
                     $7::integer[], $8::text[], $9::text[])
"""


async def record_activity_many(pool: asyncpg.Pool, records: list[ActivityRecord]) -> None:
    """A whole batch in one statement: one array per column."""
    await pool.execute(_INSERT, *zip(*records, strict=True))
