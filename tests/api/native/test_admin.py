"""The operator's API: each model's health over the last five minutes, and the audit trail in keyset pages."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from gateway.api.native.threads import encode_cursor
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
                          "'admin.reload' ORDER BY at DESC, id DESC", request_ids)
    ids = [str(r["id"]) for r in rows]
    assert [(e["id"], e["kind"], e["action"], e["method"], e["path"], e["status"], e["actor"])
            for e in first["entries"]] == [
        (ids[0], "config reloaded", "config.reloaded", "POST", "", 200, actor),
        (ids[1], "key revoked", "keys.revoke_key", "DELETE", f"/api/keys/{key['id']}", 204, actor)]
    assert first["next_cursor"] == encode_cursor(rows[1]["at"], rows[1]["id"])
    assert [e["at"] for e in first["entries"]] == [r["at"].isoformat() for r in rows[:2]]
    second = await audit(client, admin, f"?limit=1&cursor={first['next_cursor']}")
    assert [(e["id"], e["kind"], e["path"], e["status"], e["request_id"]) for e in second["entries"]] == [
        (ids[2], "key created", "/api/keys", 201, request_ids[0])]
    # nothing of what the keys or messages said: the entries carry these fields and no others
    assert set(second["entries"][0]) == {"id", "at", "kind", "action", "actor", "method", "path", "status",
                                         "request_id"}


async def test_the_audit_trail_is_in_time_order_when_rows_were_written_out_of_it(
        make_client: MakeClient, admin: User, db: asyncpg.Pool) -> None:
    # the activity log's batches and a reload's own row are two writers: a row can get a higher id
    # than a younger one. Three audited rows, written (id order) 2nd, 3rd, 1st in time.
    client = await make_client()
    base = datetime(2001, 2, 3, tzinfo=UTC)  # older than anything else in the log: read from a cursor just after
    ats = [base + timedelta(milliseconds=ms) for ms in (2, 3, 1)]
    ids = [await db.fetchval("INSERT INTO activity_log (at, user_id, action, method, path, status) "
                             "VALUES ($1, $2, 'keys.create_key', 'POST', $3, 201) RETURNING id",
                             at, admin.id, f"/order/{i}") for i, at in enumerate(ats)]
    first = await audit(client, admin, f"?limit=2&cursor={encode_cursor(base + timedelta(seconds=1), 0)}")
    assert [e["path"] for e in first["entries"]] == ["/order/1", "/order/0"]
    assert first["next_cursor"] == encode_cursor(ats[0], ids[0])
    second = await audit(client, admin, f"?limit=2&cursor={first['next_cursor']}")
    assert ([e["path"] for e in second["entries"]], second["next_cursor"]) == (["/order/2"], None)


async def test_audit_pages_refuse_a_bad_limit_or_cursor_naming_it(client, admin: User) -> None:
    now = datetime.now(UTC)
    bad_cursors = ["x", str(uuid.uuid4()), encode_cursor(now, uuid.uuid4()), encode_cursor(now, "1_0"),
                   encode_cursor(now, 2**63), encode_cursor(now.replace(tzinfo=None), 5)]
    for query, message in (("?limit=0", "limit must be an integer from 1 to 200"),
                           ("?limit=201", "limit must be an integer from 1 to 200"),
                           *((f"?cursor={c}", "cursor is not valid") for c in bad_cursors)):
        resp = await client.get("/api/admin/audit" + query, headers=admin.headers)
        assert resp.status == 400
        assert (await resp.json())["error"]["message"] == message
