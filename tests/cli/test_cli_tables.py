"""`python -m gateway keys list | keys revoke KEY | usage | leaderboard`: real
subprocesses against the test database, printing plain tables."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from gateway.store.keys import create_user_with_key
from tests.support.arena import accept_arena, demo_models_toml, unique, vote, wait_comparison_finished
from tests.support.cli import cli_env, run_cli
from tests.support.common import MakeClient, User, wait_for

pytestmark = pytest.mark.processes  # starts processes of its own (see pyproject.toml)


def when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M") if value else "-"


async def test_keys_list_prints_a_users_keys_newest_first_and_never_a_secret(tmp_path: Path, database_url: str,
                                                                          db: asyncpg.Pool) -> None:
    user_id = uuid.uuid4()
    first_id, first = await create_user_with_key(db, "laptop", ["chat"], user_id)
    second_id, second = await create_user_with_key(db, "load-test", ["chat", "arena"], user_id)
    run = await run_cli(tmp_path, cli_env(database_url), "keys", "list", "--user-id", str(user_id))
    assert run.returncode == 0 and run.stderr == "", run.stderr
    rows = await db.fetch("SELECT id, prefix, name, scopes, created_at FROM api_keys WHERE user_id = $1 "
                          "ORDER BY created_at DESC, id DESC", user_id)
    assert [r["id"] for r in rows] == [second_id, first_id]
    name_w = len("load-test")
    scopes_w = len("chat,arena")
    expected = [
        f"{'id':<36}  {'prefix':<12}  {'name':<{name_w}}  {'user':<36}  {'scopes':<{scopes_w}}  {'created':<16}  "
        "last used  revoked  today      month      total",
        "  ".join("-" * w for w in (36, 12, name_w, 36, scopes_w, 16, 9, 7, 9, 9, 9)),
        *(f"{r['id']}  {r['prefix']:<12}  {r['name']:<{name_w}}  {user_id}  {','.join(r['scopes']):<{scopes_w}}  "
          f"{when(r['created_at'])}  -          -        0 / $0.00  0 / $0.00  0 / $0.00" for r in rows),
        "2 key(s); spend in tokens / USD, a key's including its descendants'"]
    assert run.stdout.splitlines() == expected
    assert first not in run.stdout and second not in run.stdout  # the prefix only, never the key


async def test_keys_revoke_stops_the_key_and_an_unknown_id_is_exit_1(tmp_path: Path, database_url: str,
                                                                     db: asyncpg.Pool,
                                                                     make_client: MakeClient) -> None:
    key_id, key = await create_user_with_key(db, "lost", ["chat"])
    client = await make_client()
    assert (await client.get("/api/threads", headers={"Authorization": f"Bearer {key}"})).status == 200
    run = await run_cli(tmp_path, cli_env(database_url), "keys", "revoke", str(key_id))
    assert (run.returncode, run.stdout, run.stderr) == (0, f"revoked {key_id}\n", "")
    assert await db.fetchval("SELECT revoked_at IS NOT NULL FROM api_keys WHERE id = $1", key_id) is True

    async def refused() -> bool:  # the running app hears of it through NOTIFY
        return (await client.get("/api/threads", headers={"Authorization": f"Bearer {key}"})).status == 401

    await wait_for(refused)
    nobody = uuid.uuid4()
    run = await run_cli(tmp_path, cli_env(database_url), "keys", "revoke", str(nobody))
    assert (run.returncode, run.stdout, run.stderr) == (1, "", f"no key with the id, prefix or name '{nobody}'\n")


async def test_keys_revoke_takes_a_prefix_or_a_name_and_refuses_a_name_several_keys_share(
        tmp_path: Path, database_url: str, db: asyncpg.Pool) -> None:
    by_prefix_id, by_prefix = await create_user_with_key(db, "ci-prefix", ["chat"])
    run = await run_cli(tmp_path, cli_env(database_url), "keys", "revoke", by_prefix[:12])
    assert (run.returncode, run.stdout, run.stderr) == (0, f"revoked {by_prefix_id}\n", "")

    named_id, _ = await create_user_with_key(db, "ci-one-name", ["chat"])
    run = await run_cli(tmp_path, cli_env(database_url), "keys", "revoke", "ci-one-name")
    assert (run.returncode, run.stdout, run.stderr) == (0, f"revoked {named_id}\n", "")

    first_id, _ = await create_user_with_key(db, "ci-shared", ["chat"])
    second_id, _ = await create_user_with_key(db, "ci-shared", ["chat"])
    run = await run_cli(tmp_path, cli_env(database_url), "keys", "revoke", "ci-shared")
    rows = await db.fetch("SELECT id, prefix, user_id, created_at FROM api_keys WHERE name = 'ci-shared' "
                          "ORDER BY created_at DESC, id DESC")
    assert [r["id"] for r in rows] == [second_id, first_id]
    assert (run.returncode, run.stdout) == (1, "")
    assert run.stderr.splitlines() == [
        "2 keys match 'ci-shared'; revoke one by its id:",
        f"{'id':<36}  {'prefix':<12}  name       {'user':<36}  created",
        "  ".join("-" * w for w in (36, 12, 9, 36, 16)),
        *(f"{r['id']}  {r['prefix']}  ci-shared  {r['user_id']}  {when(r['created_at'])}" for r in rows)]
    assert await db.fetchval("SELECT count(*) FROM api_keys WHERE name = 'ci-shared' AND revoked_at IS NOT NULL") == 0

    # once one of them is revoked (by id), the name picks the other
    run = await run_cli(tmp_path, cli_env(database_url), "keys", "revoke", str(first_id))
    assert run.returncode == 0
    run = await run_cli(tmp_path, cli_env(database_url), "keys", "revoke", "ci-shared")
    assert (run.returncode, run.stdout, run.stderr) == (0, f"revoked {second_id}\n", "")


async def test_usage_prints_tokens_and_requests_per_day_and_per_model(
        tmp_path: Path, database_url: str, db: asyncpg.Pool, make_client: MakeClient, user: User) -> None:
    client = await make_client(DEMO_CHUNKS="5")
    for model in ("demo", "demo", "demo-alt"):
        resp = await client.post("/api/chat", headers=user.headers, json={"content": "count me", "model": model})
        assert resp.status == 202

    async def counted() -> bool:
        return await db.fetchval("SELECT count(*) FROM usage WHERE user_id = $1", user.id) == 3

    await wait_for(counted)
    rows = await db.fetch("SELECT model, prompt_tokens, completion_tokens FROM usage WHERE user_id = $1", user.id)
    prompt = rows[0]["prompt_tokens"]
    assert {(r["prompt_tokens"], r["completion_tokens"]) for r in rows} == {(prompt, 5)}
    today = datetime.now(UTC).date()

    run = await run_cli(tmp_path, cli_env(database_url), "usage", "--days", "1", "--user-id", str(user.id))
    assert run.returncode == 0, run.stderr
    widths = (10, 8, 6, 10, 12, 8)
    head = "day         requests  prompt  completion  total tokens  cost usd"
    rule = "  ".join("-" * w for w in widths)

    def line(key: str, n: int, first: int = 10) -> str:
        values = (str(n), str(n * prompt), str(n * 5), str(n * (prompt + 5)), "0")
        return "  ".join([key.ljust(first), *(v.rjust(w) for v, w in zip(values, widths[1:], strict=True))])

    assert run.stdout.splitlines() == [f"usage {today} .. {today} (UTC), user {user.id}", head, rule,
                                       line(str(today), 3), line("total", 3)]

    run = await run_cli(tmp_path, cli_env(database_url), "usage", "--by", "model", "--user-id", str(user.id))
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[3:] == [line("demo", 2, 8), line("demo-alt", 1, 8),
                                           line("total", 3, 8)]
    assert run.stdout.splitlines()[1].startswith("model     requests")

    run = await run_cli(tmp_path, cli_env(database_url), "usage", "--days", "0")
    assert run.returncode == 2 and run.stderr.endswith("error: argument --days: must be 1 to 366, got 0\n")


async def test_leaderboard_prints_ratings_intervals_and_provisional_models(
        tmp_path: Path, database_url: str, db: asyncpg.Pool, make_client: MakeClient, config_file: Any,
        user: User) -> None:
    x, y = unique("cli_x"), unique("cli_y")
    client = await make_client(GATEWAY_CONFIG=config_file(demo_models_toml(x, y)), DEMO_CHUNKS="2")
    for winner in ("a", "a", "b"):
        answer = await accept_arena(client, user, content=f"cli battle {uuid.uuid4().hex[:6]}", models=[x, y])
        await wait_comparison_finished(db, answer["comparison_id"])
        assert (await vote(client, user, answer["comparison_id"], winner)).status == 200

    run = await run_cli(tmp_path, cli_env(database_url), "leaderboard", "--rounds", "20")
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].split() == ["#", "model", "rating", "95%", "CI", "length-controlled", "battles", "win", "rate"]
    mine = {line.split()[1]: line.split() for line in lines[2:-1] if line.split()[1] in (x, y)}
    assert set(mine) == {x, y}
    # rank, model, "(provisional)", rating, low, "-", high, length-controlled, battles, win rate
    assert [mine[m][2] for m in (x, y)] == ["(provisional)"] * 2
    assert [(mine[m][8], mine[m][9]) for m in (x, y)] == [("3", "67%"), ("3", "33%")]
    assert float(mine[x][3]) > float(mine[y][3])
    for m in (x, y):
        assert float(mine[m][4]) < float(mine[m][3]) < float(mine[m][6])
    battles = await db.fetchval("SELECT count(*) FROM comparisons c JOIN messages a ON a.id = c.message_a "
                                "JOIN messages b ON b.id = c.message_b WHERE c.winner IS NOT NULL AND c.anonymous "
                                "AND a.model <> b.model")
    assert lines[-1] == (f"{battles} battle(s), anonymous comparisons; 95% intervals; provisional: fewer than 20 "
                         "battles")


async def test_usage_by_key_and_keys_list_show_spend_per_key(tmp_path: Path, database_url: str, db: asyncpg.Pool,
                                                             make_client: MakeClient, config_file: Any,
                                                             user: User) -> None:
    name = unique("cli_priced")
    client = await make_client(DEMO_CHUNKS="10", GATEWAY_CONFIG=config_file(
        f'[models.{name}]\nprovider = "demo"\ninput_price_per_mtok = 1000000\noutput_price_per_mtok = 1000000\n'))
    for _ in range(2):  # "hello": 2 prompt tokens + 10 completion tokens, $12 a turn
        resp = await client.post("/api/chat", headers=user.headers,
                                 json={"content": "hello", "max_tokens": 10, "model": name})
        assert resp.status == 202

    async def counted() -> bool:
        return await db.fetchval("SELECT count(*) FROM usage WHERE user_id = $1", user.id) == 2

    await wait_for(counted)
    key_id = await db.fetchval("SELECT id FROM api_keys WHERE user_id = $1", user.id)
    run = await run_cli(tmp_path, cli_env(database_url), "usage", "--by", "key", "--days", "1", "--user-id",
                        str(user.id))
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[1].split() == ["key", "requests", "prompt", "completion", "total", "tokens", "cost", "usd"]
    assert lines[3].split() == [str(key_id), "2", "4", "20", "24", "24"]
    run = await run_cli(tmp_path, cli_env(database_url), "keys", "list", "--user-id", str(user.id))
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[2].endswith("24 / $24.00  24 / $24.00  24 / $24.00")
