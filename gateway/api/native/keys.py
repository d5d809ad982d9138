"""API keys: create (the key is shown once), list, revoke.

Who may do what:
- An API key with the `admin` scope creates keys (for its user, or for anybody with `user_id`),
  lists its user's keys (everybody's with `all=true`) and revokes anybody's.
- Any other API key may only list itself (GET /api/keys answers its own key alone) and revoke
  itself: a `chat` key handed to a script cannot see or revoke its user's other keys.
- A signed-in user (JWT) manages their own keys: creates, lists and revokes them.

Keys form trees (sql/0008_key_tree.sql). A key created by another key is its child; keys made by
the CLI, the first-start bootstrap or a signed-in user have no parent. A child never outranks its
ancestors:
- its scopes are within its parent's (403 otherwise), its expiry is no later (it defaults to the
  parent's), and each limit the parent has is a ceiling for the child's (403 when asked for more);
- its usage counts against its own limits and every ancestor's, in the same atomic admission: a
  parent's daily tokens, daily cost (`daily_cost_usd`), month and lifetime budgets (`monthly_tokens`,
  `monthly_cost_usd`, `total_tokens`, `total_cost_usd`), requests per minute and concurrent streams
  are shared by its whole subtree, never multiplied
  (a limit the child does not set is bounded by the ancestor's, so it is not copied onto the child);
  its `max_tokens` and `models` are bounded by every ancestor's too;
- revoking a key revokes all its descendants in the same statement, on every instance within a
  second; a key whose ancestor is revoked or expired stops working with it.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from gateway.api.common import caller, json_response, parse_uuid, read_body
from gateway.contract.native import (
    KEY_NAME_MAX,
    LIMIT_INTS,
    LIMIT_USD,
    SCOPES,
    CreateKey,
    check_text,
    decode,
    key_limits,
)
from gateway.contract.operations import errors, ok, operation, path_id, query
from gateway.contract.replies import CreatedKey, KeyList
from gateway.edge.auth import Principal
from gateway.errors import BadRequest, Forbidden, NotFound, Unauthorized
from gateway.state import AUTH, DB, SETTINGS
from gateway.store import keys as key_store
from gateway.store import usage as usage_store
from gateway.webhooks import outbox

DEFAULT_SCOPES = ("chat", "arena")
_NO_SPEND = {period: {"tokens": 0, "cost_usd": 0.0} for period in ("today", "month", "total")}


def parse_expiry(raw: Any) -> datetime | None:
    if raw is None:
        return None
    if not isinstance(raw, str):
        raise BadRequest("expires_at must be an ISO-8601 string with a timezone")
    try:
        when = datetime.fromisoformat(raw)
        if when.tzinfo is None:
            raise ValueError("no timezone")
        when = when.astimezone(UTC)  # in UTC now, so an offset at the calendar's edge fails here
    except (ValueError, OverflowError):
        raise BadRequest("expires_at must be an ISO-8601 string with a timezone") from None
    if when <= datetime.now(UTC):
        raise BadRequest("expires_at must be in the future")
    return when


def within_ceiling(principal: Principal, scopes: list[str] | None, limits: dict[str, Any] | None,
                   expires_at: datetime | None) -> tuple[list[str], dict[str, Any] | None, datetime | None]:
    """What a new key gets: the request, filled in and checked against the creating credential."""
    held = principal.scopes
    if scopes is None:
        scopes = [s for s in DEFAULT_SCOPES if s in held]
        if not scopes:
            raise Forbidden(f"this credential holds none of the default scopes: name scopes among {sorted(held)}")
    elif not set(scopes) <= held:
        raise Forbidden(f"cannot grant scopes this credential lacks: {sorted(set(scopes) - held)}")
    if principal.api_key_id is None:  # a signed-in user (JWT): no ceiling beyond the scopes
        return scopes, limits, expires_at
    # a key's child: the parent's expiry and the limits of the parent and every ancestor are
    # ceilings, checked here so that nobody is handed a key that promises more than it can get.
    # They are not copied onto the child: the admission counts the child against every ancestor's
    # daily tokens and requests per minute (shared, not multiplied), and bounds it by their
    # max_tokens, streams and models (policy.limits_for).
    if principal.expires_at is not None:
        if expires_at is None:
            expires_at = principal.expires_at
        elif expires_at > principal.expires_at:
            raise Forbidden("a key cannot outlive the key that creates it")
    chain = [principal.limits or {}, *(a.limits or {} for a in principal.ancestors)]
    asked = limits or {}
    for name in (*LIMIT_INTS, *LIMIT_USD):
        caps = [c[name] for c in chain if c.get(name) is not None]
        if caps and asked.get(name) is not None and asked[name] > min(caps):
            raise Forbidden(f"limits.{name} cannot exceed this key's own ({min(caps)})")
    if asked.get("models") is not None:
        for c in chain:
            if c.get("models") is not None and not set(asked["models"]) <= set(c["models"]):
                raise Forbidden("limits.models must be among this key's own models")
    return scopes, limits, expires_at


def require_admin_key(principal: Principal, action: str) -> None:
    """API keys manage keys only with `admin`; a signed-in user (JWT) manages their own."""
    if principal.api_key_id is not None and "admin" not in principal.scopes:
        raise Forbidden(f"{action} needs the admin scope")


@operation("Create an API key (shown once)", "keys",
           {**ok(201, "The key, with its secret", CreatedKey), **errors(400, 401, 403, 413, 503)},
           body=CreateKey,
           description="With an API key, needs the `admin` scope; the new key is the caller's "
                       "child: its scopes, limits and expiry are within the caller's (403 otherwise), "
                       "its usage counts against the caller's and every ancestor's limits, and "
                       "revoking the caller revokes it. A signed-in user (JWT) creates keys of "
                       "their own, with no parent.")
async def create_key(request: web.Request) -> web.Response:
    principal = await caller(request)
    require_admin_key(principal, "creating keys")
    body = decode(await read_body(request), CreateKey)
    name = check_text(body.name, "name")
    if not name.strip():
        raise BadRequest(f"name is required: 1 to {KEY_NAME_MAX} characters")
    scopes: list[str] | None = None if body.scopes is None else [s for s in SCOPES if s in body.scopes]
    expires_at = parse_expiry(body.expires_at)
    limits = key_limits(body.limits)
    owner = principal.user_id
    if body.user_id is not None:
        owner = body.user_id
        if owner != principal.user_id and "admin" not in principal.scopes:
            raise Forbidden("only an admin may create a key for another user")
    scopes, limits, expires_at = within_ceiling(principal, scopes, limits, expires_at)
    try:
        async with request.app[DB].pool.acquire() as conn, conn.transaction():
            if owner != principal.user_id:
                await key_store.upsert_user(conn, owner, None)  # an admin provisioning a new user, as the CLI does
            # made by a key: that key's child, in its tree for good
            row, key = await key_store.issue_key(conn, owner, name, scopes, expires_at, limits, principal.api_key_id)
            # queued with the key, in its transaction: delivered later by the webhook worker
            await outbox.enqueue(conn, request.app[SETTINGS].webhooks, [outbox.key_created(row, principal.api_key_id)])
    except key_store.ParentRevoked:
        raise Unauthorized("API key revoked") from None  # revoked since it authenticated
    row["key"] = key  # the only time it is shown
    return json_response(row, status=201)


@operation("The caller's keys (admin: `all=true` for everybody's; a key without admin: itself alone)", "keys",
           {**ok(200, "The keys, newest first", KeyList), **errors(400, 401, 403, 503)},
           parameters=[query("all", {"enum": ["true", "false"], "default": "false"}, "Every user's keys (admin only)")])
async def list_keys(request: web.Request) -> web.Response:
    principal = await caller(request)
    every = request.query.get("all", "false")
    if every not in ("true", "false"):
        raise BadRequest("all must be true or false")
    if every == "true" and "admin" not in principal.scopes:
        raise Forbidden("only an admin may list every key")
    # a key without admin sees itself alone: not its user's other keys
    only = principal.api_key_id if principal.api_key_id is not None and "admin" not in principal.scopes else None
    pool, owner = request.app[DB].pool, None if every == "true" else principal.user_id
    rows = await key_store.list_keys(pool, owner, only)
    # each key's spend today, this month and in its life (its subtree's, as its limits count it)
    spend = await usage_store.key_spend(pool, [r["id"] for r in rows], owner, datetime.now(UTC).date())
    for row in rows:
        row["spend"] = spend.get(row["id"], _NO_SPEND)
    return json_response({"keys": rows})


@operation("Revoke a key and all its descendants (every instance stops accepting them within a second)", "keys",
           {**ok(204, "Revoked (also when it already was)"), **errors(400, 401, 403, 404, 503)},
           description="An API key without `admin` may revoke only itself (403 for any other id).",
           parameters=[path_id("key_id", "key")])
async def revoke_key(request: web.Request) -> web.Response:
    principal = await caller(request)
    key_id = parse_uuid(request.match_info["key_id"], "key id")
    if key_id != principal.api_key_id:
        require_admin_key(principal, "revoking another key")
    owner = None if "admin" in principal.scopes else principal.user_id
    webhooks = request.app[SETTINGS].webhooks
    # key.revoked is queued in the revocation's transaction: written if and only if it commits
    hashes = await key_store.revoke_key(
        request.app[DB].pool, key_id, owner,
        lambda conn, hashes: outbox.enqueue(conn, webhooks, [outbox.key_revoked(key_id, len(hashes))]))
    if hashes is None:
        raise NotFound("key not found")  # somebody else's is not found either
    for key_hash in hashes:  # the key and its descendants: here at once; the other instances hear NOTIFYs
        request.app[AUTH].forget_key(key_hash)
    return web.Response(status=204)
