"""SQL for the activity log: rows arrive in batches from a background writer; the audit trail is read
back from it in keyset pages on (at, id) (sql/0019_audit_trail.sql, sql/0025_audit_order.sql)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import NamedTuple

import asyncpg


class ActivityRecord(NamedTuple):
    at: datetime
    user_id: uuid.UUID | None  # None: the gateway itself (a reload sent by a signal)
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


# the rows of the audit trail; the same predicate as the partial index activity_log_audit_at, so it is used
_AUDITED = "method <> 'GET' AND (action LIKE 'keys.%' OR action LIKE 'config.%' OR action LIKE 'account.%')"

# after every row: the first page's bound (timestamptz 'infinity' as asyncpg encodes it)
_END_OF_TIME = datetime.max.replace(tzinfo=UTC)

_AUDIT_PAGE = f"""
SELECT a.id, a.at, a.user_id, a.api_key_id, k.name AS key_name, k.prefix AS key_prefix, a.action, a.method,
       a.path, a.status, a.request_id
FROM activity_log a
LEFT JOIN api_keys k ON k.id = a.api_key_id
WHERE {_AUDITED} AND (a.at, a.id) < ($1, $2)
ORDER BY a.at DESC, a.id DESC
LIMIT $3
"""


async def audit_page(pool: asyncpg.Pool, before: tuple[datetime, int] | None, limit: int) -> list[asyncpg.Record]:
    """The audit trail, newest first: at most `limit` rows older than `before` (a page's cursor: the
    (at, id) of the previous page's last row). Every user's rows: the caller is an admin."""
    at, row_id = before if before is not None else (_END_OF_TIME, 0)
    return list(await pool.fetch(_AUDIT_PAGE, at, row_id, limit))
