"""GET /api/usage/export: one line per reply (CSV or NDJSON), streamed; an admin key exports every
user's usage, anyone else their own; bad parameters are a 400 naming them. And the same export from
the command line (`python -m gateway usage export`). Real PostgreSQL, the real app."""

from __future__ import annotations

import csv
import io
import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from gateway.store.usage import EXPORT_COLUMNS
from tests.support.cli import cli_env, run_cli
from tests.support.common import User

pytestmark = pytest.mark.processes  # the command-line export runs as a subprocess

# a week of its own, far from any other test's usage rows
START = datetime(2003, 3, 3, 12, 0, tzinfo=UTC)
HEADER = ",".join(EXPORT_COLUMNS)


async def seed(db: asyncpg.Pool, user: User, days: list[int], cost: float = 0.25) -> list[uuid.UUID]:
    key = await db.fetchval("SELECT id FROM api_keys WHERE user_id = $1", user.id)
    ids = []
    for n in days:
        message_id = uuid.uuid4()
        ids.append(message_id)
        await db.execute("""
            INSERT INTO usage (message_id, user_id, api_key_id, model, provider, prompt_tokens, completion_tokens,
                               total_tokens, cached_tokens, cache_write_tokens, reasoning_tokens, estimated, cost_usd,
                               created_at)
            VALUES ($1, $2, $3, 'demo', 'demo', 7, 5, 12, 2, 1, 3, false, $4, $5)""", message_id, user.id, key, cost,
                         START + timedelta(days=n))
    return ids


async def test_a_user_exports_their_own_usage_as_csv_and_an_admin_everybodys_as_ndjson(
        client: TestClient, make_user: Any, db: asyncpg.Pool) -> None:
    alice, admin = await make_user(), await make_user(("chat", "arena", "admin"))
    alice_key = await db.fetchval("SELECT id FROM api_keys WHERE user_id = $1", alice.id)
    mine = await seed(db, alice, [0, 1, 5])
    theirs = await seed(db, admin, [1], cost=1.5)
    resp = await client.get("/api/usage/export?from=2003-03-03&to=2003-03-04&format=csv", headers=alice.headers)
    assert resp.status == 200 and resp.headers["Content-Type"] == "text/csv; charset=utf-8"
    lines = (await resp.text()).splitlines()
    assert lines == [HEADER, *(f"{m},{(START + timedelta(days=n)).isoformat()},{alice.id},{alice_key},demo,demo,"
                               "7,4,2,1,5,3,12,false,0.25" for m, n in zip(mine[:2], (0, 1), strict=True))]
    assert next(iter(csv.DictReader(io.StringIO("\n".join(lines)))))["message_id"] == str(mine[0])

    resp = await client.get("/api/usage/export?from=2003-03-03&to=2003-03-09&format=ndjson", headers=admin.headers)
    assert resp.status == 200 and resp.headers["Content-Type"] == "application/x-ndjson"
    rows = [json.loads(line) for line in (await resp.text()).splitlines()]
    # oldest first; two replies of the same moment by message id
    same = sorted([(mine[1], alice.id, 0.25), (theirs[0], admin.id, 1.5)])
    assert [(r["message_id"], r["user_id"], r["cost_usd"]) for r in rows] == [
        (str(m), str(u), c) for m, u, c in [(mine[0], alice.id, 0.25), *same, (mine[2], alice.id, 0.25)]]
    assert list(rows[0]) == list(EXPORT_COLUMNS)

    empty = await client.get("/api/usage/export?from=2002-01-01&to=2002-01-02", headers=alice.headers)
    assert (await empty.text()).splitlines() == [HEADER]


@pytest.mark.parametrize(("query", "message"), [
    ("from=2003-03-05&to=2003-03-04", "from must not be after to"),
    ("format=xml", "format must be csv or ndjson"),
    ("from=yesterday", "from must be a date (YYYY-MM-DD)"),
    ("to=2003-13-01", "to must be a date (YYYY-MM-DD)"),
])
async def test_bad_export_parameters_are_a_400_naming_them(client: TestClient, user: User, query: str,
                                                           message: str) -> None:
    resp = await client.get(f"/api/usage/export?{query}", headers=user.headers)
    assert resp.status == 400
    assert (await resp.json())["error"]["message"] == message


async def test_the_command_line_exports_every_users_usage(tmp_path: Path, database_url: str, make_user: Any,
                                                          db: asyncpg.Pool) -> None:
    user = await make_user()
    ids = await seed(db, user, [20, 21])  # 2003-03-23 and 24
    run = await run_cli(tmp_path, cli_env(database_url), "usage", "export", "--from", "2003-03-23", "--to",
                        "2003-03-24", "--format", "ndjson")
    assert run.returncode == 0, run.stderr
    assert [json.loads(line)["message_id"] for line in run.stdout.splitlines()] == [str(i) for i in ids]
    run = await run_cli(tmp_path, cli_env(database_url), "usage", "export", "--from", "2003-03-23", "--to",
                        "2003-03-23", "--user-id", str(user.id))
    assert run.stdout.splitlines()[0] == HEADER and len(run.stdout.splitlines()) == 2
    run = await run_cli(tmp_path, cli_env(database_url), "usage", "export", "--from", "2003-03-24", "--to",
                        "2003-03-23")
    assert (run.returncode, run.stderr) == (2, "--from must not be after --to\n")
