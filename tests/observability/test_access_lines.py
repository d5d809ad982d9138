"""The access line's direct path: the same bytes as the record would have given, written in
batches (by size, by time, before any other record, at exit), and still never a secret."""

from __future__ import annotations

import asyncio
import io
import logging
import re
import signal
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from gateway.edge.middleware import AccessLogger
from gateway.observability import logs
from gateway.observability.logs import LINES_BUFFERED_BYTES, GatewayHandler, configure_logging, direct_handler
from gateway.observability.metrics import Timings
from gateway.state import REQUEST_ID, TIMINGS, USER_ID
from tests.support.cli import cli_env, free_port, wait_until_healthy
from tests.support.common import REPO_ROOT, User

pytestmark = pytest.mark.processes  # one test starts the gateway (see pyproject.toml)

ACCESS = logging.getLogger("aiohttp.access")


class OpenTransport:
    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default


async def never(request: web.Request) -> web.StreamResponse:
    raise AssertionError


async def request_for(path: str, request_id: str = "req-1") -> web.Request:
    router = web.UrlDispatcher()
    router.add_get("/api/messages/{message_id}/stream", never)
    request = make_mocked_request("GET", path, transport=OpenTransport())
    request._match_info = await router.resolve(request)  # the route a served request has
    request[REQUEST_ID] = request_id
    request[USER_ID] = "6f1d2c3b-0000-4000-8000-000000000001"
    timings = Timings()
    timings.phases.update(auth=0.25, first_token=3.5)
    request[TIMINGS] = timings
    return request


@pytest.fixture
def own_handler() -> Iterator[None]:
    """Logging as `python -m gateway` sets it up, restored afterwards (pytest's own handlers too)."""
    saved_handlers, saved_level, saved_own = logging.root.handlers[:], logging.root.level, logs._OWN_HANDLER
    logging.root.handlers.clear()
    try:
        yield
    finally:
        logging.root.handlers[:] = saved_handlers
        logging.root.setLevel(saved_level)
        logs._OWN_HANDLER = saved_own


def gateway_handler(fmt: str) -> tuple[GatewayHandler, io.StringIO]:
    logging.root.handlers.clear()  # pytest's capturing handlers, added for the test's call
    configure_logging("INFO", fmt)
    [handler] = logging.root.handlers
    assert isinstance(handler, GatewayHandler)
    stream = io.StringIO()
    handler.setStream(stream)
    return handler, stream


def without_time(line: str) -> str:
    """The line without what differs between two calls: the time, and the request's own duration."""
    line = re.sub(r'^\S+ \S+ |"ts":"[^"]+",', "", line)
    return re.sub(r'(200 |"ms":)[\d.]+', r"\1", line)


@pytest.mark.parametrize("fmt", ["text", "json"])
async def test_a_direct_line_is_what_the_record_would_have_printed(own_handler: None, fmt: str):
    handler, stream = gateway_handler(fmt)
    logger = AccessLogger(ACCESS, "")
    path = "/api/messages/3f0c/stream?token=eyJhbGciOiJIUzI1NiJ9.e30.sig&after=2"
    assert direct_handler(ACCESS) is handler
    logger.log(await request_for(path, "direct"), web.StreamResponse(status=200), 0.01)
    handler.write_lines()
    ACCESS.addFilter(logging.Filter())  # something else in the way: the ordinary record path
    try:
        assert direct_handler(ACCESS) is None
        logger.log(await request_for(path, "record"), web.StreamResponse(status=200), 0.01)
    finally:
        ACCESS.filters.pop()
    direct, record = stream.getvalue().splitlines()
    assert without_time(direct).replace("direct", "record") == without_time(record)
    if fmt == "text":
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO aiohttp\.access direct GET "
                            r"/api/messages/3f0c/stream\?token=\[redacted\]&after=2 200 [\d.]+ms auth=0\.2ms "
                            r"first_token=3\.5ms user=6f1d2c3b-0000-4000-8000-000000000001", direct), direct
    else:
        obj = orjson.loads(direct)
        assert list(obj)[:4] == ["ts", "level", "logger", "message"]
        assert {k: obj[k] for k in ("level", "logger", "route", "status", "path", "auth_ms")} == {
            "level": "INFO", "logger": "aiohttp.access", "route": "/api/messages/{message_id}/stream",
            "status": 200, "path": "/api/messages/3f0c/stream?token=[redacted]&after=2", "auth_ms": 0.25}


async def test_a_secret_in_a_client_chosen_request_id_is_redacted_on_the_direct_path(own_handler: None):
    handler, stream = gateway_handler("json")
    AccessLogger(ACCESS, "").log(await request_for("/api/messages/1/stream", "gwk_leaked.secret"),
                                 web.StreamResponse(status=200), 0.01)
    handler.write_lines()
    text = stream.getvalue()
    assert "leaked" not in text and orjson.loads(text)["request_id"] == "gwk_[redacted]"


async def test_lines_wait_at_most_a_tenth_of_a_second_or_until_another_record(own_handler: None):
    _, stream = gateway_handler("text")
    logger = AccessLogger(ACCESS, "")
    for n in range(3):
        logger.log(await request_for("/api/messages/1/stream", f"line-{n}"), web.StreamResponse(status=200), 0.01)
    assert stream.getvalue() == ""  # buffered
    await asyncio.sleep(0.15)
    assert [line.split()[4] for line in stream.getvalue().splitlines()] == ["line-0", "line-1", "line-2"]
    logger.log(await request_for("/api/messages/1/stream", "line-3"), web.StreamResponse(status=200), 0.01)
    logging.getLogger("gateway.test").warning("after line-3")  # an ordinary record: behind what waits
    assert [line.split()[4] for line in stream.getvalue().splitlines()[3:]] == ["line-3", "after"]


async def test_lines_are_written_once_64_kib_wait(own_handler: None):
    _, stream = gateway_handler("text")
    logger = AccessLogger(ACCESS, "")
    n = 0
    while not stream.getvalue():
        logger.log(await request_for("/api/messages/1/stream", f"n{n}"), web.StreamResponse(status=200), 0.01)
        n += 1
    written = stream.getvalue()
    assert len(written) >= LINES_BUFFERED_BYTES and written.count("\n") == n


async def test_sigterm_loses_no_access_line(tmp_path: Path, database_url: str, user: User):
    port = free_port()
    log_path = tmp_path / "serve.log"
    env = cli_env(database_url, SHUTDOWN_GRACE_S="2", PYTHONPATH=str(REPO_ROOT))  # default level: INFO
    with log_path.open("wb") as log_file:
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "gateway", "serve", "--port", str(port),
                                                    cwd=tmp_path, env=env, stdout=log_file, stderr=log_file)
    base = f"http://127.0.0.1:{port}"
    ids = [f"last-{uuid.uuid4().hex[:8]}" for _ in range(40)]
    try:
        async with aiohttp.ClientSession() as session:
            await wait_until_healthy(session, base + "/healthz", proc, log_path)
            for request_id in ids:
                async with session.get(base + "/api/me", headers={"Authorization": f"Bearer {user.key}",
                                                                   "X-Request-Id": request_id}) as resp:
                    assert resp.status == 200
        proc.send_signal(signal.SIGTERM)  # at once: the last lines are still in the buffer
        assert await asyncio.wait_for(proc.wait(), 15) == 0, log_path.read_text()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    access = [line.split()[4] for line in log_path.read_text().splitlines() if " INFO aiohttp.access " in line]
    assert [a for a in access if a.startswith("last-")] == ids
