"""API keys: create (the key is shown once), list, revoke.

Users manage their own keys; `admin` manages everybody's. A key never mints a key stronger
than itself: its scopes, limits and expiry are the ceiling for the keys it creates (admin
excepted). A JWT user's session is not a ceiling: its keys are the user's own.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from aiohttp import web

from ..auth import Principal
from ..errors import BadRequest, Forbidden, NotFound
from ..state import AUTH, DB
from ..store import keys as key_store
from .common import caller, check_text, json_response, optional, parse_uuid, read_json

SCOPES = ("chat", "arena", "admin")
DEFAULT_SCOPES = ("chat", "arena")
NAME_MAX = 100
# integers the policy passes to SQL as `integer`
LIMIT_INTS = ("requests_per_minute", "daily_tokens", "max_concurrent_streams", "max_tokens")
LIMIT_MAX = 2**31 - 1
MODELS_MAX = 100


def parse_scopes(raw: Any) -> list[str] | None:
    if raw is None:
        return None
    if not isinstance(raw, list) or not raw or not all(isinstance(s, str) for s in raw):
        raise BadRequest(f"scopes must be a non-empty list drawn from {list(SCOPES)}")
    unknown = sorted(set(raw) - set(SCOPES))
    if unknown:
        raise BadRequest(f"unknown scopes {unknown}: allowed are {list(SCOPES)}")
    return [s for s in SCOPES if s in raw]  # canonical order, no duplicates


def parse_expiry(raw: Any) -> datetime | None:
    if raw is None:
        return None
    if not isinstance(raw, str):
        raise BadRequest("expires_at must be an ISO-8601 string with a timezone")
    try:
        when = datetime.fromisoformat(raw)
        if when.tzinfo is None:
            raise ValueError("no timezone")
        when = when.astimezone(timezone.utc)  # in UTC now, so an offset at the calendar's edge fails here
    except (ValueError, OverflowError):
        raise BadRequest("expires_at must be an ISO-8601 string with a timezone") from None
    if when <= datetime.now(timezone.utc):
        raise BadRequest("expires_at must be in the future")
    return when


def parse_limits(raw: Any) -> dict[str, Any] | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise BadRequest("limits must be an object")
    unknown = sorted(set(raw) - {*LIMIT_INTS, "models"})
    if unknown:
        raise BadRequest(f"unknown limits {unknown}: allowed are {[*LIMIT_INTS, 'models']}")
    limits: dict[str, Any] = {}
    for name in LIMIT_INTS:
        value = raw.get(name)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= LIMIT_MAX:
            raise BadRequest(f"limits.{name} must be an integer from 1 to {LIMIT_MAX}")
        limits[name] = value
    models = raw.get("models")
    if models is not None:
        if (not isinstance(models, list) or not models or len(models) > MODELS_MAX
                or not all(isinstance(m, str) and m and len(m) <= 200 for m in models)):
            raise BadRequest(f"limits.models must be a list of 1 to {MODELS_MAX} model names")
        for m in models:
            check_text(m, "limits.models")
        limits["models"] = list(dict.fromkeys(models))
    return limits or None


def within_ceiling(principal: Principal, scopes: list[str] | None, limits: dict[str, Any] | None,
                   expires_at: datetime | None) -> tuple[list[str], dict[str, Any] | None, datetime | None]:
    """What a new key gets: the request, filled in and checked against the creating key."""
    if "admin" in principal.scopes:
        return scopes or list(DEFAULT_SCOPES), limits, expires_at
    if scopes is None:
        scopes = [s for s in DEFAULT_SCOPES if s in principal.scopes]
    elif not set(scopes) <= principal.scopes:
        raise Forbidden(f"cannot grant scopes this credential lacks: {sorted(set(scopes) - principal.scopes)}")
    if principal.api_key_id is None:  # a signed-in user (JWT): no ceiling beyond the scopes
        return scopes, limits, expires_at
    if principal.expires_at is not None:
        if expires_at is None:
            expires_at = principal.expires_at
        elif expires_at > principal.expires_at:
            raise Forbidden("a key cannot outlive the key that creates it")
    ceiling = principal.limits or {}
    if ceiling:
        limits = dict(limits or {})
        for name in LIMIT_INTS:
            cap = ceiling.get(name)
            if cap is None:
                continue
            if limits.get(name) is None:
                limits[name] = cap
            elif limits[name] > cap:
                raise Forbidden(f"limits.{name} cannot exceed this key's own ({cap})")
        if ceiling.get("models") is not None:
            if limits.get("models") is None:
                limits["models"] = list(ceiling["models"])
            elif not set(limits["models"]) <= set(ceiling["models"]):
                raise Forbidden("limits.models must be among this key's own models")
    return scopes, limits, expires_at


async def create_key(request: web.Request) -> web.Response:
    principal = await caller(request)
    body = await read_json(request)
    name = optional(body, "name", str, "a string")
    if not name or not name.strip() or len(name) > NAME_MAX:
        raise BadRequest(f"name is required: 1 to {NAME_MAX} characters")
    scopes = parse_scopes(body.get("scopes"))
    expires_at = parse_expiry(body.get("expires_at"))
    limits = parse_limits(body.get("limits"))
    owner = principal.user_id
    if body.get("user_id") is not None:
        owner = parse_uuid(body["user_id"], "user_id")
        if owner != principal.user_id and "admin" not in principal.scopes:
            raise Forbidden("only an admin may create a key for another user")
    scopes, limits, expires_at = within_ceiling(principal, scopes, limits, expires_at)
    async with request.app[DB].pool.acquire() as conn, conn.transaction():
        if owner != principal.user_id:
            await key_store.upsert_user(conn, owner, None)  # an admin provisioning a new user, as the CLI does
        row, key = await key_store.issue_key(conn, owner, name, scopes, expires_at, limits)
    row["key"] = key  # the only time it is shown
    return json_response(row, status=201)


async def list_keys(request: web.Request) -> web.Response:
    principal = await caller(request)
    every = request.query.get("all", "false")
    if every not in ("true", "false"):
        raise BadRequest("all must be true or false")
    if every == "true" and "admin" not in principal.scopes:
        raise Forbidden("only an admin may list every key")
    rows = await key_store.list_keys(request.app[DB].pool, None if every == "true" else principal.user_id)
    return json_response({"keys": rows})


async def revoke_key(request: web.Request) -> web.Response:
    principal = await caller(request)
    key_id = parse_uuid(request.match_info["key_id"], "key id")
    owner = None if "admin" in principal.scopes else principal.user_id
    key_hash = await key_store.revoke_key(request.app[DB].pool, key_id, owner)
    if key_hash is None:
        raise NotFound("key not found")  # somebody else's is not found either
    request.app[AUTH].forget_key(key_hash)  # here at once; the other instances hear the notification
    return web.Response(status=204)
