"""Webhooks: events queued in the outbox table and delivered by the background worker of every
instance, signed as the Standard Webhooks specification says (the receivers here verify each
delivery with the `standardwebhooks` library), at least once and once per event across the fleet,
retried with backoff, delivered by another instance after a restart, dead-lettered at the end of
the retry period. Real PostgreSQL, two app instances on one database, a receiver on loopback."""

from __future__ import annotations

import asyncio
import base64
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
from aiohttp import web
from standardwebhooks import Webhook

from gateway.config import ConfigError, Settings
from tests.support.cli import cli_env, run_cli
from tests.support.common import MakeClient, User, wait_for

pytestmark = pytest.mark.processes  # the dead letters are listed by the command line, a subprocess

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
FAST = {"WEBHOOK_POLL_S": "0.05", "WEBHOOK_RETRY_S": "0.2"}


class Receiver:
    """An endpoint that answers each delivery with the next scripted status (then 204), verifying
    every delivery's signature as a receiver would."""

    def __init__(self, statuses: list[int] | None = None) -> None:
        self.statuses = list(statuses or [])
        self.got: list[tuple[str, dict[str, Any], int, float]] = []  # (webhook-id, payload, answered, when)
        self.app = web.Application()
        self.app.router.add_post("/hook/{name}", self.hook)
        self.url = ""

    async def hook(self, request: web.Request) -> web.Response:
        body = await request.read()
        payload = Webhook(SECRET).verify(body, dict(request.headers))  # raises unless signed right
        status = self.statuses.pop(0) if self.statuses else 204
        self.got.append((request.headers["webhook-id"], payload, status, asyncio.get_running_loop().time()))
        return web.Response(status=status)

    def delivered(self) -> list[dict[str, Any]]:
        return [payload for _, payload, status, _ in self.got if status < 300]


@pytest.fixture
async def receiver(aiohttp_server: Any) -> Any:
    async def make(statuses: list[int] | None = None) -> Receiver:
        r = Receiver(statuses)
        server = await aiohttp_server(r.app)
        # a path of its own: a later test's receiver may get the same port, never the same URL
        r.url = str(server.make_url(f"/hook/{uuid.uuid4().hex}"))
        return r

    return make


def hooks_toml(url: str, events: list[str], thresholds: list[float] | None = None, extra: str = "") -> str:
    lines = [extra, "[[webhooks]]", f'url = "{url}"', f'secret = "{SECRET}"',
             f"events = {orjson.dumps(events).decode()}"]
    if thresholds is not None:
        lines.append(f"thresholds = {thresholds}")
    return "\n".join(lines) + "\n"


async def outbox(db: asyncpg.Pool, url: str) -> list[asyncpg.Record]:
    return await db.fetch("SELECT event, attempts, delivered_at IS NOT NULL AS delivered, dead_at IS NOT NULL AS dead, "
                          "last_error FROM webhook_outbox WHERE endpoint = $1 ORDER BY created_at", url)


async def test_key_events_are_signed_and_delivered_once_across_two_instances(
        make_client: MakeClient, config_file: Any, make_user: Any, receiver: Any, db: asyncpg.Pool) -> None:
    r = await receiver()
    path = config_file(hooks_toml(r.url, ["key.created", "key.revoked"]))
    a = await make_client(GATEWAY_CONFIG=path, **FAST)
    b = await make_client(GATEWAY_CONFIG=path, **FAST)
    admin = await make_user(("chat", "arena", "admin"))
    made = await a.post("/api/keys", headers=admin.headers, json={"name": "ci", "scopes": ["chat"]})
    assert made.status == 201
    key = await made.json()
    assert (await b.delete(f"/api/keys/{key['id']}", headers=admin.headers)).status == 204
    await wait_for(lambda: _count(r, 2))
    await asyncio.sleep(0.5)  # both instances' workers have run many rounds since
    assert [p["type"] for p in r.delivered()] == ["key.created", "key.revoked"]
    created, revoked = (p["data"] for p in r.delivered())
    parent = await db.fetchval("SELECT id FROM api_keys WHERE user_id = $1 AND parent_id IS NULL", admin.id)
    assert created == {"key_id": key["id"], "user_id": str(admin.id), "name": "ci", "prefix": key["prefix"],
                       "scopes": ["chat"], "parent_id": str(parent)}
    assert revoked == {"key_id": key["id"], "descendants_revoked": 0}
    assert key["key"] not in str(r.got)  # never the secret
    assert len({msg_id for msg_id, *_ in r.got}) == 2 and all(m.startswith("msg_") for m, *_ in r.got)
    assert [tuple(row) for row in await outbox(db, r.url)] == [("key.created", 1, True, False, None),
                                                               ("key.revoked", 1, True, False, None)]


async def queued_with_the_key(db: asyncpg.Pool, url: str, event: str, key_id: str) -> list[tuple[str, bool]]:
    """The endpoint's `event` rows for the key, each with whether the transaction that wrote it is
    the one that last wrote the key's row (xmin: the writing transaction's id)."""
    rows = await db.fetch("""
        SELECT o.payload, o.xmin::text = k.xmin::text AS same FROM webhook_outbox o
        JOIN api_keys k ON k.id = (o.payload -> 'data' ->> 'key_id')::uuid
        WHERE o.endpoint = $1 AND o.event = $2 AND k.id = $3::uuid""", url, event, key_id)
    return [(r["payload"]["data"]["key_id"], r["same"]) for r in rows]


async def test_key_events_are_queued_in_the_transaction_that_changes_the_key_by_the_api_and_the_command_line(
        make_client: MakeClient, config_file: Any, make_user: Any, database_url: str, db: asyncpg.Pool,
        tmp_path: Path) -> None:
    url = f"http://127.0.0.1:9/hook/{uuid.uuid4().hex}"  # nobody answers: the rows stay as queued
    path = config_file(hooks_toml(url, ["key.created", "key.revoked"]))
    env = cli_env(database_url, GATEWAY_CONFIG=path)

    made = await run_cli(tmp_path, env, "keys", "create", "--name", "by-cli", "--scopes", "chat")
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip().splitlines()[-1]
    row = await db.fetchrow("SELECT id, user_id, prefix FROM api_keys WHERE prefix = $1", key[:12])
    key_id = str(row["id"])
    assert await queued_with_the_key(db, url, "key.created", key_id) == [(key_id, True)]
    payload = await db.fetchval("SELECT payload FROM webhook_outbox WHERE endpoint = $1", url)
    assert payload["data"] == {"key_id": key_id, "user_id": str(row["user_id"]), "name": "by-cli",
                               "prefix": row["prefix"], "scopes": ["chat"], "parent_id": None}
    revoked = await run_cli(tmp_path, env, "keys", "revoke", key_id)
    assert (revoked.returncode, revoked.stdout.strip()) == (0, f"revoked {key_id}")
    assert await queued_with_the_key(db, url, "key.revoked", key_id) == [(key_id, True)]

    # through the API: the worker reads the outbox once at start, then not for a long while
    client = await make_client(GATEWAY_CONFIG=path, WEBHOOK_POLL_S="1000")
    admin = await make_user(("chat", "arena", "admin"))
    made_api = await client.post("/api/keys", headers=admin.headers, json={"name": "by-api", "scopes": ["chat"]})
    assert made_api.status == 201
    api_id = (await made_api.json())["id"]
    assert (await client.delete(f"/api/keys/{api_id}", headers=admin.headers)).status == 204
    assert await queued_with_the_key(db, url, "key.revoked", api_id) == [(api_id, True)]
    # a second revocation changes nothing and queues nothing
    assert (await client.delete(f"/api/keys/{api_id}", headers=admin.headers)).status == 204
    assert await db.fetchval("SELECT count(*) FROM webhook_outbox WHERE endpoint = $1", url) == 4


async def _count(r: Receiver, n: int) -> bool:
    return len(r.delivered()) >= n


async def test_budget_thresholds_and_exhaustion_are_announced_once_across_two_instances(
        make_client: MakeClient, config_file: Any, user: User, receiver: Any, db: asyncpg.Pool) -> None:
    r = await receiver()
    path = config_file(hooks_toml(r.url, ["budget.threshold", "budget.exhausted"], [0.5],
                                  extra="[limits]\nmonthly_tokens = 24\n"))
    a = await make_client(GATEWAY_CONFIG=path, DEMO_CHUNKS="10", **FAST)
    b = await make_client(GATEWAY_CONFIG=path, DEMO_CHUNKS="10", **FAST)
    body = {"content": "hello", "max_tokens": 10}  # 2 prompt + 10 completion tokens

    def mine() -> list[dict[str, Any]]:  # the budgets are everybody's: other tests' users cross them too
        return [p for p in r.delivered() if p["data"].get("user_id") == str(user.id)]

    async def heard(n: int) -> bool:
        return len(mine()) >= n

    assert (await a.post("/api/chat", headers=user.headers, json=body)).status == 202
    await wait_for(lambda: heard(1))
    assert (await b.post("/api/chat", headers=user.headers, json=body)).status == 202
    await wait_for(lambda: heard(2))
    await asyncio.sleep(0.5)
    month = (await db.fetchval("SELECT to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM')"))
    who = {"subject": "user", "user_id": str(user.id), "window": "monthly_tokens", "period": month, "limit": 24.0}
    assert [(p["type"], p["data"]) for p in mine()] == [
        ("budget.threshold", {**who, "used": 12.0, "threshold": 0.5}),
        ("budget.exhausted", {**who, "used": 24.0})]


async def test_a_failing_receiver_is_retried_with_backoff_until_it_answers(
        make_client: MakeClient, config_file: Any, make_user: Any, receiver: Any, db: asyncpg.Pool) -> None:
    r = await receiver([500, 503])
    client = await make_client(GATEWAY_CONFIG=config_file(hooks_toml(r.url, ["key.created"])), **FAST)
    admin = await make_user(("chat", "arena", "admin"))
    assert (await client.post("/api/keys", headers=admin.headers, json={"name": "retry"})).status == 201
    await wait_for(lambda: _count(r, 1))
    assert [status for _, _, status, _ in r.got] == [500, 503, 204]
    assert len({msg_id for msg_id, *_ in r.got}) == 1  # the same event each time
    first, second, third = (when for *_, when in r.got)
    assert second - first >= 0.2 and third - second >= 0.4  # the delay doubles

    async def recorded() -> bool:  # the worker writes the outcome once the receiver has answered
        return [tuple(row) for row in await outbox(db, r.url)] == [("key.created", 3, True, False, None)]

    await wait_for(recorded)


async def test_a_gateway_restarted_mid_retry_delivers_the_event_after_it(
        make_client: MakeClient, config_file: Any, make_user: Any, receiver: Any, db: asyncpg.Pool) -> None:
    r = await receiver([500] * 1000)
    path = config_file(hooks_toml(r.url, ["key.created"]))
    first = await make_client(GATEWAY_CONFIG=path, **FAST)
    admin = await make_user(("chat", "arena", "admin"))
    assert (await first.post("/api/keys", headers=admin.headers, json={"name": "restart"})).status == 201

    async def tried() -> bool:
        return len(r.got) >= 2

    await wait_for(tried)
    await first.close()  # the gateway stops mid-retry
    failed = len(r.got)
    r.statuses = []  # the receiver is back
    await make_client(GATEWAY_CONFIG=path, **FAST)  # and the gateway starts again
    await wait_for(lambda: _count(r, 1))
    await asyncio.sleep(0.3)
    assert [p["type"] for p in r.delivered()] == ["key.created"]
    assert len({msg_id for msg_id, *_ in r.got}) == 1
    assert [tuple(row) for row in await outbox(db, r.url)] == [("key.created", failed + 1, True, False, None)]


async def test_an_event_is_dead_lettered_after_its_retry_period_and_listed(
        make_client: MakeClient, config_file: Any, make_user: Any, receiver: Any, db: asyncpg.Pool,
        tmp_path: Path, database_url: str) -> None:
    r = await receiver([500] * 1000)
    client = await make_client(GATEWAY_CONFIG=config_file(hooks_toml(r.url, ["key.created"])),
                               WEBHOOK_GIVE_UP_S="0.5", **FAST)
    admin = await make_user(("chat", "arena", "admin"))
    assert (await client.post("/api/keys", headers=admin.headers, json={"name": "dead"})).status == 201

    async def dead() -> bool:
        return [row["dead"] for row in await outbox(db, r.url)] == [True]

    await wait_for(dead)
    tries = len(r.got)
    await asyncio.sleep(0.5)
    assert len(r.got) == tries  # given up: not tried again
    msg_id = r.got[0][0]
    run = await run_cli(tmp_path, cli_env(database_url), "webhooks", "--dead")
    assert run.returncode == 0, run.stderr
    line = next(line for line in run.stdout.splitlines() if line.startswith(msg_id))
    assert line.split()[:5] == [msg_id, "key.created", r.url, "dead", str(tries)] and line.endswith("HTTP 500")
    r.statuses = []  # the receiver is back: a dead letter is tried again on demand
    run = await run_cli(tmp_path, cli_env(database_url), "webhooks", "redeliver", msg_id)
    assert (run.returncode, run.stdout) == (0, f"{msg_id} will be delivered again\n")
    await wait_for(lambda: _count(r, 1))
    assert [tuple(row)[:4] for row in await outbox(db, r.url)] == [("key.created", 1, True, False)]


@pytest.mark.parametrize(("entry", "message"), [
    ('url = "ftp://x.example/hook"\nsecret = "{secret}"', "[[webhooks]] #1 url must be an http:// or https:// URL, "
                                                        "got 'ftp://x.example/hook'"),
    ('url = "https://x.example/hook"\nsecret = "nope"',
     "[[webhooks]] #1 secret must be whsec_ followed by the base64 of at least 24 bytes"),
    ('url = "https://x.example/hook"\nsecret = "{secret}"\nevents = ["key.deleted"]',
     "[[webhooks]] #1 events: unknown ['key.deleted']: allowed are ['budget.threshold', 'budget.exhausted', "
     "'key.created', 'key.revoked']"),
    ('url = "https://x.example/hook"\nsecret = "{secret}"\nthresholds = [0.5, 1.5]',
     "[[webhooks]] #1 thresholds must be a non-empty list of fractions between 0 and 1, got [0.5, 1.5]"),
    ('url = "https://x.example/hook"\nsecret = "{secret}"\nretries = 3',
     "GATEWAY_CONFIG: [[webhooks]] #1 retries: unknown key (valid: url, secret, events, thresholds)"),
])
def test_a_bad_webhook_entry_is_a_configuration_error_naming_it(config_file: Any, entry: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        Settings.from_env({"GATEWAY_CONFIG": config_file("[[webhooks]]\n" + entry.format(secret=SECRET) + "\n")})
    assert str(e.value) == message


def test_a_good_entry_keeps_its_events_and_thresholds(config_file: Any) -> None:
    settings = Settings.from_env({"GATEWAY_CONFIG": config_file(hooks_toml("https://x.example/h", ["key.revoked"],
                                                                           [0.95, 0.5]))})
    (hook,) = settings.webhooks
    assert (hook.url, hook.events, hook.thresholds) == ("https://x.example/h", ("key.revoked",), (0.5, 0.95))
    assert SECRET not in repr(hook)
