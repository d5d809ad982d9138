"""Threads: create, list (latest activity first, keyset pages on (updated_at, id)), read with messages,
delete."""

from __future__ import annotations

import base64
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TypeVar

from aiohttp import web

from gateway.api.common import caller, json_response, parse_uuid, read_body
from gateway.contract.native import CreateThread, check_text, decode
from gateway.contract.operations import errors, ok, operation, path_id, query
from gateway.contract.replies import Thread, ThreadPage, ThreadWithMessages
from gateway.errors import BadRequest
from gateway.state import DB
from gateway.store import arena as arena_store
from gateway.store import threads as thread_store

PAGE_DEFAULT, PAGE_MAX = 20, 100
T = TypeVar("T")


def encode_cursor(at: datetime, key: object) -> str:
    """A keyset page's cursor: the (time, key) of the previous page's last row, opaque to clients."""
    return base64.urlsafe_b64encode(f"{at.isoformat()}|{key}".encode()).decode().rstrip("=")


def decode_cursor(raw: str, key: Callable[[str], T]) -> tuple[datetime, T]:
    """`encode_cursor`'s (time, key), the key read by `key` (which raises ValueError on a bad one)."""
    try:
        text = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)).decode()
        stamp, _, rest = text.partition("|")
        at = datetime.fromisoformat(stamp)
        if at.tzinfo is None:  # never issued by us; asyncpg would guess its zone
            raise ValueError("cursor timestamp without a zone")
        # in UTC here, so a forged offset at the edge of the calendar fails now, not in asyncpg
        return at.astimezone(UTC), key(rest)
    except (ValueError, OverflowError):
        raise BadRequest("cursor is not valid") from None


@operation("Create a thread", "threads", {**ok(201, "The new thread", Thread), **errors(400, 401, 403, 413, 503)},
           body=CreateThread, body_required=False)
async def create_thread(request: web.Request) -> web.Response:
    principal = await caller(request, "chat")
    body = decode(await read_body(request), CreateThread) if request.can_read_body else CreateThread()
    title = body.title if body.title is None else check_text(body.title, "title")
    thread = await thread_store.create_thread(request.app[DB].pool, principal.user_id, title)
    return json_response(thread, status=201)


@operation("The caller's threads, newest first (keyset pages)", "threads",
           {**ok(200, "A page of threads", ThreadPage), **errors(400, 401, 403, 503)},
           parameters=[query("limit", {"type": "integer", "minimum": 1, "maximum": 100, "default": 20}, "Page size"),
                       query("cursor", {"type": "string"}, "`next_cursor` of the previous page")])
async def list_threads(request: web.Request) -> web.Response:
    principal = await caller(request, "chat")
    raw_limit = request.query.get("limit", str(PAGE_DEFAULT))
    # ASCII digits only and bounded length: int() refuses "²" (which isdigit() allows) and >4300 digits
    if not (raw_limit.isascii() and raw_limit.isdigit() and len(raw_limit) <= len(str(PAGE_MAX))
            and 1 <= int(raw_limit) <= PAGE_MAX):
        raise BadRequest(f"limit must be an integer from 1 to {PAGE_MAX}")
    limit = int(raw_limit)
    cursor = request.query.get("cursor")
    before = decode_cursor(cursor, uuid.UUID) if cursor else None
    # one extra row tells whether there is a next page
    rows = await thread_store.list_threads(request.app[DB].pool, principal.user_id, limit + 1, before)
    page, more = rows[:limit], len(rows) > limit
    next_cursor = encode_cursor(page[-1]["updated_at"], page[-1]["id"]) if more else None
    return json_response({"threads": page, "next_cursor": next_cursor})


@operation("A thread with its messages", "threads",
           {**ok(200, "The thread", ThreadWithMessages), **errors(400, 401, 403, 404, 503)},
           parameters=[path_id("thread_id", "thread")])
async def get_thread(request: web.Request) -> web.Response:
    principal = await caller(request, "chat")
    thread_id = parse_uuid(request.match_info["thread_id"], "thread id")
    pool = request.app[DB].pool
    thread = await thread_store.get_thread(pool, principal.user_id, thread_id)
    thread["messages"] = await arena_store.masked(pool, thread["messages"])
    return json_response(thread)


@operation("Delete a thread and its messages (usage is kept)", "threads",
           {**ok(204, "Deleted"), **errors(400, 401, 403, 404, 503)}, parameters=[path_id("thread_id", "thread")])
async def delete_thread(request: web.Request) -> web.Response:
    principal = await caller(request, "chat")
    thread_id = parse_uuid(request.match_info["thread_id"], "thread id")
    await thread_store.delete_thread(request.app[DB].pool, principal.user_id, thread_id)
    return web.Response(status=204)
