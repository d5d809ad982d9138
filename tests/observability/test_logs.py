"""Logs: one access line per request with its timing breakdown; LOG_FORMAT=json; never a secret."""

from __future__ import annotations

import asyncio
import logging
import re
import signal
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import jwt
import orjson
import pytest

from gateway.app import create_app
from gateway.config import Settings
from gateway.edge.middleware import AccessLogger
from gateway.errors import ConfigError
from gateway.observability.logs import REDACT, TEXT_FORMAT, JsonFormatter, install_redaction, redact
from tests.support.cli import cli_env, free_port, wait_until_healthy
from tests.support.common import REPO_ROOT, User, wait_for
from tests.support.fakes import FakeUpstream, parse_sse
from tests.support.raw_requests import hostile_requests, secret_parts, send_raw

pytestmark = pytest.mark.processes  # starts processes of its own (see pyproject.toml)

JWT_SECRET = "logs-test-jwt-secret-that-is-32-bytes-or-more"
UPSTREAM_KEY = "sk-upstream-" + "u" * 32


def access_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "aiohttp.access"]


async def test_access_line_breaks_a_streamed_chat_down_into_auth_persist_and_first_token(
        aiohttp_server: Any, aiohttp_client: Any, make_settings: Any, user: User, caplog: pytest.LogCaptureFixture):
    # the real app behind the access logger `python -m gateway serve` installs
    app = create_app(make_settings())
    client = await aiohttp_client(await aiohttp_server(app, access_log_class=AccessLogger))
    caplog.set_level(logging.INFO, logger="aiohttp.access")
    resp = await client.post("/api/chat", json={"content": "time me", "stream": True},
                             headers={**user.headers, "X-Request-Id": "timed-chat-1"})
    assert resp.status == 200
    await resp.read()

    async def logged() -> bool:
        return any(getattr(r, "request_id", None) == "timed-chat-1" for r in access_records(caplog))

    await wait_for(logged)
    record = next(r for r in access_records(caplog) if getattr(r, "request_id", None) == "timed-chat-1")
    fields = {k: getattr(record, k) for k in ("request_id", "method", "path", "route", "status", "user_id")}
    assert fields == {"request_id": "timed-chat-1", "method": "POST", "path": "/api/chat", "route": "/api/chat",
                      "status": 200, "user_id": str(user.id)}
    for phase in ("auth_ms", "persist_ms", "first_token_ms"):
        assert 0 <= getattr(record, phase) <= record.ms
    assert re.fullmatch(rf"timed-chat-1 POST /api/chat 200 \d+\.\dms auth=\d+\.\dms persist=\d+\.\dms "
                        rf"first_token=\d+\.\dms user={user.id}", record.getMessage()), record.getMessage()


async def test_access_line_of_an_unauthenticated_request_has_no_user_and_no_later_phases(
        aiohttp_server: Any, aiohttp_client: Any, make_settings: Any, caplog: pytest.LogCaptureFixture):
    client = await aiohttp_client(await aiohttp_server(create_app(make_settings()), access_log_class=AccessLogger))
    caplog.set_level(logging.INFO, logger="aiohttp.access")
    bad_key = "gwk_" + "b" * 43
    resp = await client.post("/api/chat", json={"content": "no"},
                             headers={"Authorization": f"Bearer {bad_key}", "X-Request-Id": "bad-key-1"})
    assert resp.status == 401

    async def logged() -> bool:
        return any(getattr(r, "request_id", None) == "bad-key-1" for r in access_records(caplog))

    await wait_for(logged)
    record = next(r for r in access_records(caplog) if getattr(r, "request_id", None) == "bad-key-1")
    assert (record.status, record.user_id, record.route) == (401, None, "/api/chat")
    assert not hasattr(record, "persist_ms") and not hasattr(record, "first_token_ms")
    assert record.getMessage().endswith(" user=-") and bad_key not in record.getMessage()


class Odd:
    def __repr__(self) -> str:
        return "<odd>"


def test_json_formatter_writes_one_object_per_line_with_extra_fields_and_the_traceback():
    try:
        raise ValueError("two\nlines")
    except ValueError:
        record = logging.LogRecord("gateway.x", logging.ERROR, __file__, 1, "failed %s", ("here",), sys.exc_info())
    record.request_id = "r-1"
    record.odd = Odd()  # not JSON by itself: written as its repr, the line survives
    line = JsonFormatter().format(record)
    assert "\n" not in line
    obj = orjson.loads(line)
    assert (obj["level"], obj["logger"], obj["message"], obj["request_id"]) == ("ERROR", "gateway.x", "failed here",
                                                                               "r-1")
    assert obj["odd"] == "<odd>"
    assert obj["exc"].startswith("Traceback") and obj["exc"].endswith("ValueError: two\nlines")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", obj["ts"])


async def test_a_real_server_logs_json_lines_without_any_key_token_or_secret(
        tmp_path: Path, database_url: str, user: User, upstream: FakeUpstream):
    sub = uuid.uuid4()
    token = jwt.encode({"sub": str(sub), "aud": "authenticated", "exp": int(time.time()) + 600}, JWT_SECRET,
                       algorithm="HS256")
    bad_key = "gwk_" + "z" * 43
    port = free_port()
    log_path = tmp_path / "serve.log"
    env = cli_env(database_url, LOG_FORMAT="json", LOG_LEVEL="DEBUG", JWT_SECRET=JWT_SECRET,
                  OPENAI_API_KEY=UPSTREAM_KEY, OPENAI_BASE_URL=upstream.base_url, OPENAI_MODEL="fake",
                  SHUTDOWN_GRACE_S="2", PYTHONPATH=str(REPO_ROOT))  # this checkout's code
    with log_path.open("wb") as log_file:
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "gateway", "serve", "--port", str(port),
                                                    cwd=tmp_path, env=env, stdout=log_file, stderr=log_file)
    base = f"http://127.0.0.1:{port}"
    as_key = {"Authorization": f"Bearer {user.key}"}
    as_jwt = {"Authorization": f"Bearer {token}"}
    try:
        async with aiohttp.ClientSession() as session:
            await wait_until_healthy(session, base + "/healthz", proc, log_path)
            async with session.post(base + "/api/chat", json={"content": "key chat", "stream": True},
                                    headers={**as_key, "X-Request-Id": "log-key-chat"}) as resp:
                assert resp.status == 200
                assert parse_sse(await resp.read())[-1].data == "[DONE]"
            async with session.post(base + "/api/chat", json={"content": "jwt chat"},
                                    headers={**as_jwt, "X-Request-Id": "log-jwt-chat"}) as resp:
                assert resp.status == 202
                stream_url = (await resp.json())["stream_url"]
            stream_token = stream_url.partition("?token=")[2]
            async with session.get(base + stream_url, headers={"X-Request-Id": "log-stream-url"}) as resp:
                assert resp.status == 200
                assert parse_sse(await resp.read())[-1].data == "[DONE]"
            async with session.get(base + "/api/me", headers={"Authorization": f"Bearer {bad_key}",
                                                              "X-Request-Id": "log-bad-key"}) as resp:
                assert resp.status == 401
            async with session.post(base + "/api/keys", json={"name": "minted"},
                                    headers={**as_jwt, "X-Request-Id": "log-new-key"}) as resp:
                assert resp.status == 201
                new_key = (await resp.json())["key"]
            async with session.get(base + "/api/me", headers={"Authorization": f"Bearer {new_key}"}) as resp:
                assert resp.status == 200
            # a malformed request: aiohttp's parser error quotes the header, key and all
            status, _, body = await send_raw(SimpleNamespace(host="127.0.0.1", port=port),
                                             hostile_requests(user.key)["control character in Authorization"])
            assert status == 400 and b"malformed HTTP request" in body
            async with session.post(base + "/v1/chat/completions", headers={**as_key, "X-Request-Id": "log-openai"},
                                    json={"model": "fake", "stream": True,
                                          "messages": [{"role": "user", "content": "sdk chat"}]}) as resp:
                assert resp.status == 200
                assert (await resp.read()).endswith(b"data: [DONE]\n\n")
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0, log_path.read_text()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()

    assert upstream.headers[0]["Authorization"] == f"Bearer {UPSTREAM_KEY}"  # the upstream key was in use
    text = log_path.read_text()
    for name, secret in {"API key": user.key, "JWT": token, "JWT secret": JWT_SECRET, "stream token": stream_token,
                         "new key": new_key, "bad key": bad_key, "upstream key": UPSTREAM_KEY}.items():
        assert secret not in text, f"the {name} is in the log"
    for part in secret_parts(user.key):  # nor any piece of the key the malformed request split
        assert part not in text
    lines = [orjson.loads(line) for line in text.splitlines() if line.strip()]  # every line is one JSON object
    assert all({"ts", "level", "logger", "message"} <= obj.keys() for obj in lines)
    access = {obj["request_id"]: obj for obj in lines if obj["logger"] == "aiohttp.access"}
    [refused] = [obj for obj in lines if obj["logger"] == "aiohttp.server"]
    assert refused["message"] == "Error handling request from 127.0.0.1" and "BadHttpMessage" in refused["exc"]
    assert [obj["route"] for obj in access.values() if obj["status"] == 400] == ["malformed"]

    def fields(request_id: str, *keys: str) -> dict[str, Any]:
        return {k: access[request_id][k] for k in keys}

    basic = ("method", "path", "route", "status", "user_id")
    assert fields("log-key-chat", *basic) == {"method": "POST", "path": "/api/chat", "route": "/api/chat",
                                              "status": 200, "user_id": str(user.id)}
    assert {"auth_ms", "persist_ms", "first_token_ms", "ms"} <= access["log-key-chat"].keys()
    assert fields("log-jwt-chat", "status", "user_id") == {"status": 202, "user_id": str(sub)}
    assert "first_token_ms" not in access["log-jwt-chat"]
    mid = stream_url.split("/")[3]
    assert fields("log-stream-url", *basic) == {
        "method": "GET", "path": f"/api/messages/{mid}/stream?token=[redacted]",
        "route": "/api/messages/{message_id}/stream", "status": 200, "user_id": str(sub)}
    assert "first_token_ms" in access["log-stream-url"]
    assert fields("log-bad-key", "status", "user_id", "route") == {"status": 401, "user_id": None,
                                                                   "route": "/api/me"}
    assert fields("log-new-key", "status", "route") == {"status": 201, "route": "/api/keys"}
    assert fields("log-openai", "status", "route") == {"status": 200, "route": "/v1/chat/completions"}
    assert {"auth_ms", "first_token_ms"} <= access["log-openai"].keys()


@pytest.mark.parametrize(("name", "value"), [("LOG_FORMAT", "xml"), ("METRICS_PORT", "0"), ("METRICS_PORT", "70000"),
                                             ("METRICS_PORT", "http")])
def test_bad_log_or_metrics_setting_fails_at_start_naming_it(name: str, value: str):
    with pytest.raises(ConfigError, match=f"^{name} "):
        Settings.from_env({name: value})


KEY = "gwk_" + "K" * 16 + "-secret_tail_0123456789ab"
JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJl"


@pytest.mark.parametrize(("text", "clean"), [
    (f"Authorization: Bearer {KEY}", "Authorization: [redacted]"),
    # a key split by a control character, as aiohttp's parser error prints the header
    (f"b'Authorization: Bearer {KEY[:20]}\\x01{KEY[20:]}'\n   ^", "b'Authorization: [redacted]'\n   ^"),
    ("{'authorization': 'Basic dXNlcjpwYXNz', 'Host': 'gw'}", "{'authorization': '[redacted]', 'Host': 'gw'}"),
    (f"X-Api-Key: {KEY}\r\nHost: gw", "X-Api-Key: [redacted]\nHost: gw"),
    (f"b' Bearer {KEY}'", "b' Bearer [redacted]'"),  # an obs-fold line: the credential without its header
    (f"GET /api/x?token={KEY}&n=1 HTTP/1.1", "GET /api/x?token=[redacted]&n=1 HTTP/1.1"),
    ("/cb?access_token=abc.def&api_key=xyz&password=hunter2",
     "/cb?access_token=[redacted]&api_key=[redacted]&password=[redacted]"),
    (f"key {KEY[:20]}\\r{KEY[20:]} refused", "key gwk_[redacted] refused"),
    (f"jwt {JWT}, then", "jwt [redacted], then"),
    ("GET /api/messages/5d1e/stream 200 3.1ms first_token=2.0ms monkey=1 user=42 www.example.com", None),
])
def test_redact_removes_every_kind_of_secret_and_keeps_the_rest(text: str, clean: str | None):
    assert redact(text) == (text if clean is None else clean)
    assert redact(redact(text)) == redact(text)  # a second filter on the way changes nothing


def test_the_filter_redacts_message_args_extra_fields_and_the_traceback_before_any_formatter():
    try:
        raise ValueError(f"bad header Bearer {KEY}")
    except ValueError:
        record = logging.LogRecord("aiohttp.server", logging.ERROR, __file__, 1, "refused %s from %s",
                                   (f"token={KEY}", "127.0.0.1"), sys.exc_info())
    record.request_header = {"Authorization": f"Bearer {KEY}"}  # as aiohttp's access log gives headers
    record.path = f"/x?token={KEY}"
    record.status = 400
    assert REDACT.filter(record) is True
    assert (record.getMessage(), record.request_header, record.path, record.status) == (
        "refused token=[redacted] from 127.0.0.1", {"Authorization": "Bearer [redacted]"}, "/x?token=[redacted]", 400)
    # the exception object would print the key afresh: only its redacted text goes on
    assert record.exc_info is None
    assert record.exc_text is not None and record.exc_text.startswith("Traceback")
    assert record.exc_text.endswith("ValueError: bad header Bearer [redacted]")
    for formatter in (JsonFormatter(), logging.Formatter(TEXT_FORMAT)):
        line = formatter.format(record)
        assert KEY[4:] not in line and "ValueError: bad header Bearer [redacted]" in line


def test_a_traceback_without_a_secret_keeps_its_exception():
    try:
        raise KeyError("model")
    except KeyError:
        record = logging.LogRecord("gateway.x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    REDACT.filter(record)
    assert record.exc_info is not None and record.exc_info[0] is KeyError
    assert orjson.loads(JsonFormatter().format(record))["exc"].endswith("KeyError: 'model'")


@pytest.mark.parametrize("name", ["aiohttp.server", "aiohttp.access", "aiohttp.web", "aiohttp.client", "gateway",
                                  "gateway.edge.middleware", "gateway.api.native.ws", "asyncio"])
def test_records_of_aiohttp_and_gateway_loggers_reach_any_handler_redacted(name: str,
                                                                            caplog: pytest.LogCaptureFixture):
    # caplog's handler is not ours: the filter on the logger is what cleans the record
    install_redaction()
    caplog.set_level(logging.DEBUG)
    logging.getLogger(name).warning("saw %s", f"Authorization: Bearer {KEY}")
    assert [r.getMessage() for r in caplog.records] == ["saw Authorization: [redacted]"]
