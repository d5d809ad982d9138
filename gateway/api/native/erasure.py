"""DELETE /api/admin/users/{user_id}: erase a user, for an API key with the `admin` scope.

Every row that names the user goes — threads, messages, keys (and keys issued under them),
comparisons and votes, usage, activity — and their reply streams in Redis; their usage stays
only as totals naming nobody. The user's keys answer 401 on every instance within a second.
The request's own activity row (the admin's) is the audit entry: it names the erased user's id
in its path and nothing of their content. An admin erases other users only (their own user
through `python -m gateway users erase`).
"""

from __future__ import annotations

from aiohttp import web

from gateway.api.common import caller, json_response, parse_uuid
from gateway.contract.operations import errors, ok, operation, path_id
from gateway.errors import BadRequest, Forbidden, NotFound
from gateway.service import erasure
from gateway.state import AUTH, DB, REDIS

_ERASED = {"type": "object", "required": ["user_id", "erased", "keys_revoked", "redis_streams"],
           "properties": {"user_id": {"type": "string", "format": "uuid"}, "erased": {"type": "object"},
                          "keys_revoked": {"type": "integer"},
                          "redis_streams": {"type": ["integer", "null"]}}}


@operation("Erase a user: every row that names them and their reply streams (admin)", "account",
           {**ok(200, "What was removed", _ERASED), **errors(400, 401, 403, 404, 503)},
           description="Their usage stays only as totals naming nobody; their keys answer 401 on every "
                       "instance within a second. An admin cannot erase their own user here.",
           parameters=[path_id("user_id", "user")])
async def erase_user(request: web.Request) -> web.Response:
    principal = await caller(request)
    if "admin" not in principal.scopes:
        raise Forbidden("erasing a user needs the admin scope")
    user_id = parse_uuid(request.match_info["user_id"], "user id")
    if user_id == principal.user_id:
        raise BadRequest("user id is the caller's own: erase it with `python -m gateway users erase`")
    done = await erasure.erase_user(request.app[DB].pool, user_id, link=request.app[REDIS],
                                    forget_key=request.app[AUTH].forget_key)
    if done is None:
        raise NotFound("user not found")
    return json_response({"user_id": user_id, "erased": done.erased.as_dict(), "keys_revoked": done.keys_revoked,
                          "redis_streams": done.redis_streams})
