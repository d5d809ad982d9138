"""The operator's API (the `admin` scope; anybody else gets 403): model health, the audit trail, reload.

- GET /api/admin/models: every configured model, its provider, whether it is enabled, its circuit,
  and its last five minutes (requests, error rate, time to first token p50/p95, fallbacks taken).
  Provider and enabled come from the configuration every instance reads (`"scope": "config"`); the
  circuits and the five minutes are this instance's own, in memory (`"scope": "instance"`, with its
  id): behind a load balancer each instance answers for the traffic it served.
- GET /api/admin/audit: the activity log's changes of who may do what and what runs (keys created,
  revoked or changed, the configuration reloaded, a user erased), newest first, in keyset pages
  (`?limit=` 1 to 200, `?cursor=` the previous page's `next_cursor`). Each entry names the actor (user,
  key), the time, the request id, the method, path and status: never a message's content.
- POST /api/admin/reload: read the configuration file again; 200 with what changed, or 422 naming
  the file, the line and the key when it does not validate (the running configuration is kept).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from gateway.api.common import caller, json_response
from gateway.api.native.threads import decode_cursor, encode_cursor
from gateway.contract.operations import errors, json_content, ok, operation, query, ref, response
from gateway.errors import BadRequest, ConfigError, ConfigRejected
from gateway.observability.health import WINDOW_S
from gateway.providers.registry import deployment_link
from gateway.service.reload import as_json
from gateway.state import DB, HEALTH, INSTANCE, MODELS, RELOADER, REQUEST_ID
from gateway.store.activity import audit_page

PAGE_DEFAULT = 50
PAGE_MAX = 200

# what an audit row means, by the log's action and method
KINDS = {("keys", "POST"): "key created", ("keys", "DELETE"): "key revoked", ("keys", "PATCH"): "key limits changed",
         ("keys", "PUT"): "key limits changed"}


@operation("Every model: provider, enabled, circuit, and this instance's last five minutes", "admin",
           {**ok(200, "The models", {"type": "object"}), **errors(401, 403)})
async def models(request: web.Request) -> web.Response:
    await caller(request, "admin")
    registry, health = request.app[MODELS], request.app[HEALTH]
    circuits = registry.circuits
    listed: list[dict[str, Any]] = []
    for name, model in registry.models.items():
        entry: dict[str, Any] = {"name": name, "provider": model.provider, "upstream": model.upstream,
                                 "kind": model.kind, "enabled": model.enabled, "fallbacks": list(model.fallbacks),
                                 "default": name == registry.default,
                                 "circuit": circuits.state(model.circuit_key).value}
        if model.deployments:
            links = [deployment_link(model, i) for i in range(len(model.deployments))]
            entry["deployments"] = [{"provider": link.provider, "upstream": link.upstream,
                                     "circuit": circuits.state(link.circuit_key).value} for link in links]
            entry["circuit"] = "open" if not registry.available(model) else entry["circuit"]
        entry["last_5_minutes"] = health.window(name)
        listed.append(entry)
    return json_response({
        "models": listed,
        "scope": {"provider": "config", "enabled": "config", "circuit": "instance", "last_5_minutes": "instance"},
        "instance_id": request.app[INSTANCE].id, "window_s": WINDOW_S})


@operation("The audit trail (keys created, revoked or changed; configuration reloads), newest first", "admin",
           {**ok(200, "A page of entries and the next page's cursor", {"type": "object"}), **errors(400, 401, 403)},
           parameters=[query("limit", {"type": "integer", "minimum": 1, "maximum": 200, "default": 50},
                             "Entries per page"),
                       query("cursor", {"type": "string"}, "The previous page's next_cursor")])
async def audit(request: web.Request) -> web.Response:
    await caller(request, "admin")
    limit = _number(request.query.get("limit", str(PAGE_DEFAULT)), "limit", 1, PAGE_MAX)
    cursor = request.query.get("cursor")
    before = decode_cursor(cursor, _row_id) if cursor is not None else None
    rows = await audit_page(request.app[DB].pool, before, limit + 1)  # one more: is there a next page
    page, more = rows[:limit], len(rows) > limit
    return json_response({"entries": [_entry(r) for r in page],
                          "next_cursor": encode_cursor(page[-1]["at"], page[-1]["id"]) if more else None})


def _row_id(text: str) -> int:
    # an activity_log id: ASCII digits, within bigint (int() would also take "1_0" or " 10 ")
    if not (text.isascii() and text.isdigit() and len(text) <= 19 and int(text) < 2**63):
        raise ValueError("cursor id")
    return int(text)


def _entry(row: Any) -> dict[str, Any]:
    family = row["action"].partition(".")[0]
    if family == "config":
        kind = "config reloaded" if row["status"] < 400 else "config reload refused"
    elif family == "account":
        kind = "user erased"
    else:
        kind = KINDS.get((family, row["method"]), row["action"])
    actor = ({"user_id": row["user_id"], "api_key_id": row["api_key_id"], "key_name": row["key_name"],
              "key_prefix": row["key_prefix"]} if row["user_id"] is not None else {"signal": row["method"]})
    return {"id": str(row["id"]), "at": row["at"], "kind": kind, "action": row["action"], "actor": actor,
            "method": row["method"], "path": row["path"], "status": row["status"], "request_id": row["request_id"]}


@operation("Read the configuration file again; new turns use it, streaming replies keep theirs", "admin",
           {**ok(200, "What changed", {"type": "object"}), **errors(401, 403),
            "422": response("The file does not validate (file, line and key named); nothing changed",
                            json_content(ref("Error")))})
async def reload(request: web.Request) -> web.Response:
    principal = await caller(request, "admin")
    try:
        changed = await request.app[RELOADER].reload(
            via=request.method, user_id=principal.user_id, api_key_id=principal.api_key_id,
            request_id=request.get(REQUEST_ID), ip=request.remote)
    except ConfigError as e:
        raise ConfigRejected(e.message) from None
    return json_response(as_json(changed))


def _number(raw: str, name: str, low: int, high: int) -> int:
    # ASCII digits only and bounded length: int() refuses "²" (which isdigit() allows) and >4300 digits
    if not (raw.isascii() and raw.isdigit() and len(raw) <= len(str(high)) and low <= int(raw) <= high):
        raise BadRequest(f"{name} must be an integer from {low} to {high}")
    return int(raw)
