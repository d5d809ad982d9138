"""The operator's API: each model's health over the last five minutes, and the audit trail in keyset pages."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from gateway.state import INSTANCE
from tests.support.chat import first_metadata
from tests.support.common import MakeClient, User, wait_for
from tests.support.fakes import FakeUpstream, Reply


@pytest.fixture
async def admin(make_user) -> User:
    return await make_user(("chat", "arena", "admin"))


FALLING = """[providers.flaky]
kind = "openai"
base_url = "{url}"

[models.alpha]
provider = "flaky"
upstream = "up-alpha"
fallbacks = ["beta"]

[models.beta]
provider = "demo"

[router]
default = "alpha"
"""


async def test_models_show_provider_circuit_and_the_last_five_minutes_of_this_instance(
        make_client: MakeClient, upstream: FakeUpstream, tmp_path: Path, user: User, admin: User) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(FALLING.format(url=upstream.base_url))
    upstream.queue(Reply(status=500, body=b'{"error": {"message": "down"}}'))
    client = await make_client(GATEWAY_CONFIG=str(config))
    resp = await client.post("/api/chat", json={"stream": True, "content": "hi"}, headers=user.headers)
    meta = first_metadata(await resp.read())
    assert (meta["model"], meta["fallback_from"]) == ("beta", "alpha")

    answer = await client.get("/api/admin/models", headers=admin.headers)
    assert answer.status == 200
    body = await answer.json()
    beta = body["models"][2]["last_5_minutes"]
    p50, p95 = beta.pop("ttft_p50_ms"), beta.pop("ttft_p95_ms")
    assert isinstance(p50, float) and p50 == p95 and p50 >= 0  # one first token: both percentiles are it
    assert body == {
        "models": [
            {"name": "demo", "provider": "demo", "upstream": "demo", "kind": "chat", "enabled": True, "fallbacks": [],
             "default": False, "circuit": "closed",
             "last_5_minutes": {"requests": 0, "errors": 0, "error_rate": None, "ttft_p50_ms": None,
                                "ttft_p95_ms": None, "fallbacks": 0}},
            {"name": "alpha", "provider": "flaky", "upstream": "up-alpha", "kind": "chat", "enabled": True,
             "fallbacks": ["beta"], "default": True, "circuit": "closed",
             "last_5_minutes": {"requests": 1, "errors": 1, "error_rate": 1.0, "ttft_p50_ms": None,
                                "ttft_p95_ms": None, "fallbacks": 1}},
            {"name": "beta", "provider": "demo", "upstream": "beta", "kind": "chat", "enabled": True, "fallbacks": [],
             "default": False, "circuit": "closed",
             "last_5_minutes": {"requests": 1, "errors": 0, "error_rate": 0.0, "fallbacks": 0}},
        ],
        "scope": {"provider": "config", "enabled": "config", "circuit": "instance", "last_5_minutes": "instance"},
        "instance_id": str(client.app[INSTANCE].id), "window_s": 300.0}


async def audit(client: Any, admin: User, query: str = "") -> dict[str, Any]:
    resp = await client.get("/api/admin/audit" + query, headers=admin.headers)
    assert resp.status == 200, await resp.text()
    return await resp.json()


async def test_the_audit_trail_reads_keys_created_and_revoked_and_reloads_back_in_keyset_pages(
        make_client: MakeClient, admin: User, db: asyncpg.Pool) -> None:
    client = await make_client()
    created = await client.post("/api/keys", json={"name": "script", "limits": {"daily_tokens": 1000}},
                                headers=admin.headers)
    assert created.status == 201
    key = await created.json()
    revoked = await client.delete(f"/api/keys/{key['id']}", headers=admin.headers)
    assert revoked.status == 204
    reloaded = await client.post("/api/admin/reload", headers=admin.headers)
    assert reloaded.status == 200
    request_ids = [r.headers["X-Request-ID"] for r in (created, revoked, reloaded)]

    async def written() -> bool:
        return [e["request_id"] for e in (await audit(client, admin, "?limit=3"))["entries"]] == request_ids[::-1]

    await wait_for(written)
    admin_key = await db.fetchrow("SELECT id, name, prefix FROM api_keys WHERE user_id = $1 AND name = 'test'",
                                  admin.id)
    actor = {"user_id": str(admin.id), "api_key_id": str(admin_key["id"]), "key_name": admin_key["name"],
             "key_prefix": admin_key["prefix"]}
    first = await audit(client, admin, "?limit=2")
    rows = await db.fetch("SELECT id, at FROM activity_log WHERE request_id = ANY($1::text[]) AND action <> "
                          "'admin.reload' ORDER BY id DESC", request_ids)
    ids = [str(r["id"]) for r in rows]
    assert [(e["id"], e["kind"], e["action"], e["method"], e["path"], e["status"], e["actor"])
            for e in first["entries"]] == [
        (ids[0], "config reloaded", "config.reloaded", "POST", "", 200, actor),
        (ids[1], "key revoked", "keys.revoke_key", "DELETE", f"/api/keys/{key['id']}", 204, actor)]
    assert first["next_cursor"] == ids[1]
    assert [e["at"] for e in first["entries"]] == [r["at"].isoformat() for r in rows[:2]]
    second = await audit(client, admin, f"?limit=1&cursor={first['next_cursor']}")
    assert [(e["id"], e["kind"], e["path"], e["status"], e["request_id"]) for e in second["entries"]] == [
        (ids[2], "key created", "/api/keys", 201, request_ids[0])]
    # nothing of what the keys or messages said: the entries carry these fields and no others
    assert set(second["entries"][0]) == {"id", "at", "kind", "action", "actor", "method", "path", "status",
                                         "request_id"}


async def test_audit_pages_refuse_a_bad_limit_or_cursor_naming_it(client, admin: User) -> None:
    for query, name, high in (("?limit=0", "limit", 200), ("?limit=201", "limit", 200),
                              ("?cursor=x", "cursor", 2**63 - 1), (f"?cursor={uuid.uuid4()}", "cursor", 2**63 - 1)):
        resp = await client.get("/api/admin/audit" + query, headers=admin.headers)
        assert resp.status == 400
        assert (await resp.json())["error"]["message"] == f"{name} must be an integer from 1 to {high}"
