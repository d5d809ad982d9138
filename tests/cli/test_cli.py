"""`python -m gateway` as a user runs it: real subprocesses against the test database."""

from __future__ import annotations

import asyncio
import hashlib
import re
import signal
import socket
import sys
import uuid
from pathlib import Path

import aiohttp
import asyncpg
import orjson
import pytest

from tests.support.cli import cli_env, free_port, run_cli, wait_until_healthy
from tests.support.common import MakeClient
from tests.support.fakes import parse_sse

pytestmark = pytest.mark.processes  # starts processes of its own (see pyproject.toml)

KEY_LINE = re.compile(r"gwk_[A-Za-z0-9_-]{43}")


async def create_key_via_cli(tmp_path: Path, database_url: str, name: str = "ci") -> str:
    run = await run_cli(tmp_path, cli_env(database_url), "keys", "create", "--name", name)
    assert run.returncode == 0, run.stderr
    # the key alone, on one line: scripts take stdout's last line as the key
    key, newline = run.stdout[:-1], run.stdout[-1:]
    assert KEY_LINE.fullmatch(key) and newline == "\n", run.stdout
    return key


async def test_migrate_on_a_migrated_database_applies_nothing(tmp_path: Path, database_url: str):
    run = await run_cli(tmp_path, cli_env(database_url), "migrate")
    assert (run.returncode, run.stdout, run.stderr) == (0, "applied: nothing (up to date)\n", "")


async def test_keys_create_prints_a_working_key_stored_only_as_hash_and_prefix(
        tmp_path: Path, database_url: str, db: asyncpg.Pool, make_client: MakeClient):
    key = await create_key_via_cli(tmp_path, database_url)

    row = await db.fetchrow("SELECT id, name, prefix, scopes, revoked_at FROM api_keys WHERE key_hash = $1",
                            hashlib.sha256(key.encode()).digest())
    assert row is not None
    assert (row["name"], row["prefix"], row["scopes"], row["revoked_at"]) == ("ci", key[:12], ["chat", "arena"], None)
    # the plaintext appears in no column of any key row
    assert await db.fetchval("SELECT count(*) FROM api_keys k WHERE strpos(k::text, $1) > 0", key) == 0

    client = await make_client()
    resp = await client.get("/api/threads", headers={"Authorization": f"Bearer {key}"})
    assert resp.status == 200
    assert await resp.json() == {"threads": [], "next_cursor": None}


@pytest.mark.parametrize(("name", "value", "message"), [
    ("GATEWAY_PORT", "abc", "GATEWAY_PORT must be an integer, got 'abc'"),
    ("DB_POOL_MAX", "0", "DB_POOL_MAX must be >= 1, got 0"),
    ("GATEWAY_CONFIG", "/nonexistent", "GATEWAY_CONFIG: cannot read /nonexistent: No such file or directory")])
async def test_bad_setting_exits_2_naming_the_variable(tmp_path: Path, database_url: str, name: str, value: str,
                                                       message: str):
    run = await run_cli(tmp_path, cli_env(database_url, **{name: value}), "migrate")
    assert (run.returncode, run.stdout, run.stderr) == (2, "", f"configuration error: {message}\n")


async def test_serve_streams_a_chat_and_exits_cleanly_on_sigterm(tmp_path: Path, database_url: str,
                                                                 db: asyncpg.Pool):
    key = await create_key_via_cli(tmp_path, database_url, "serve-test")
    port = free_port()
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log_file:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "serve", "--port", str(port), cwd=tmp_path,
            env=cli_env(database_url, SHUTDOWN_GRACE_S="2"), stdout=log_file, stderr=log_file)
    try:
        base = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as session:
            await wait_until_healthy(session, base + "/healthz", proc, log_path)
            async with session.post(base + "/api/chat", json={"content": "Hello", "stream": True},
                                    headers={"Authorization": f"Bearer {key}"}) as resp:
                assert resp.status == 200
                events = parse_sse(await resp.read())
        assert [e.event for e in events] == ["metadata"] + ["message"] * 12 + ["usage", "done", "message"]
        assert events[-1].data == "[DONE]"
        message_id = uuid.UUID(orjson.loads(events[0].data)["message_id"])
        text = "".join(orjson.loads(e.data)["delta"] for e in events[1:13])
        row = await db.fetchrow("SELECT status, content FROM messages WHERE id = $1", message_id)
        assert (row["status"], row["content"]) == ("complete", text)

        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0, log_path.read_text()
        # said once, when the socket was bound
        assert log_path.read_text().count(f"gateway on http://127.0.0.1:{port} (default model demo)") == 1
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_a_port_in_use_is_one_line_naming_gateway_port_and_exit_2(tmp_path: Path, database_url: str):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = await run_cli(tmp_path, cli_env(database_url, GATEWAY_HOST="127.0.0.1", GATEWAY_PORT=str(port),
                                              LOG_LEVEL="INFO"), "serve")
    assert run.returncode == 2 and run.stdout == ""
    lines = run.stderr.splitlines()
    assert lines[-1] == f"GATEWAY_PORT: cannot listen on 127.0.0.1:{port}: Address already in use", run.stderr
    assert "Traceback" not in run.stderr
    assert not any("gateway on http" in line for line in lines)  # said only once the socket is bound


async def test_the_installed_script_names_itself_in_its_help(tmp_path: Path):
    script = Path(sys.executable).parent / "chat-gateway"  # the console script pip installs beside python
    proc = await asyncio.create_subprocess_exec(script, "--help", cwd=tmp_path, env=cli_env(""),
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    assert (proc.returncode, err) == (0, b"")
    assert out.decode().startswith("usage: chat-gateway [-h]"), out
    run = await run_cli(tmp_path, cli_env(""), "--help")
    assert run.stdout.startswith("usage: python -m gateway [-h]"), run.stdout
