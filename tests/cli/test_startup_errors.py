"""A DATABASE_URL the gateway cannot use stops every command with one line and exit code 2."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests.support.cli import cli_env, free_port, run_cli
from tests.support.common import with_database

pytestmark = pytest.mark.processes  # runs the real command line as subprocesses

COMMANDS = [("serve", "--port", "0"), ("migrate",), ("keys", "list"), ("keys", "create", "--name", "x")]


def bad_urls(pg_server_url: str) -> list[tuple[str, str]]:
    """(DATABASE_URL, the line the command prints) for the three ways an operator gets it wrong."""
    port = free_port()  # nothing listens there
    return [
        (f"postgresql://postgres@127.0.0.1:{port}/postgres", "DATABASE_URL: connection refused\n"),
        (with_database(pg_server_url, "gw_no_such_database"),
         'DATABASE_URL: database "gw_no_such_database" does not exist\n'),
        ("mysql://postgres@127.0.0.1:5432/postgres",
         "DATABASE_URL: scheme is expected to be either \"postgresql\" or \"postgres\", got 'mysql'\n"),
    ]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c[:2]))
async def test_an_unusable_database_url_is_one_line_and_exit_code_2(
        tmp_path: Path, pg_server_url: str, command: tuple[str, ...]):
    for url, line in bad_urls(pg_server_url):
        run = await run_cli(tmp_path, cli_env(url), *command)
        assert (run.returncode, run.stdout, run.stderr) == (2, "", line), url


async def test_serve_with_workers_refuses_an_unusable_database_url_once(tmp_path: Path):
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
    run = await run_cli(tmp_path, cli_env(url), "serve", "--port", "0", "--workers", "2")
    assert (run.returncode, run.stdout, run.stderr) == (2, "", "DATABASE_URL: connection refused\n")


async def test_a_database_password_is_never_printed(tmp_path: Path):
    url = f"postgresql://postgres:s3cret-pw@127.0.0.1:{free_port()}/postgres"
    run = await run_cli(tmp_path, cli_env(url), "migrate")
    assert (run.returncode, run.stderr) == (2, "DATABASE_URL: connection refused\n")


async def test_a_taken_metrics_port_is_named_as_metrics_port(tmp_path: Path, database_url: str):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = await run_cli(tmp_path, cli_env(database_url, METRICS_PORT=str(port), LOG_LEVEL="WARNING"),
                            "serve", "--port", "0")
    assert (run.returncode, run.stdout, run.stderr) == (
        2, "", f"METRICS_PORT: cannot listen on 127.0.0.1:{port}: Address already in use\n")
