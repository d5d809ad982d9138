"""The activity log's edge: one row per authenticated request, queued as the response starts.

A response-prepare signal (not a middleware): streamed responses start long before their
handler returns, and the signal sees every response once, errors included. Nothing here waits
for the database; a background writer batches the rows.
"""

from __future__ import annotations

import functools
import uuid
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from gateway.state import ACTIVITY, PRINCIPAL, REQUEST_ID, USER_ID
from gateway.store.activity import ActivityRecord


@functools.lru_cache(maxsize=256)
def action_of(handler: Any) -> str:
    """'keys.create_key': the handler's module and name, stable across path changes."""
    module = getattr(handler, "__module__", "") or ""
    return f"{module.rpartition('.')[2]}.{getattr(handler, '__name__', type(handler).__name__)}"


async def record_activity(request: web.Request, response: web.StreamResponse) -> None:
    raw_user = request.get(USER_ID)
    writer = request.app.get(ACTIVITY)
    if raw_user is None or writer is None:
        return  # nobody authenticated: the access log has it
    principal = request.get(PRINCIPAL)
    if principal is not None:
        user_id, key_id = principal.user_id, principal.api_key_id
    else:  # authenticated another way (a stream token): the user alone
        try:
            user_id, key_id = uuid.UUID(raw_user), None
        except ValueError:
            return
    route = request.match_info.route
    # the raw path: no query string (it may carry a token), and no decoded NUL that text refuses
    path = request.rel_url.raw_path
    writer.add(ActivityRecord(datetime.now(UTC), user_id, key_id, route.name or action_of(route.handler),
                              request.method, path, response.status, request.remote, request.get(REQUEST_ID)))
