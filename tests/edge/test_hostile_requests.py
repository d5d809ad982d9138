"""Malformed requests over a raw socket: a 400 in our JSON error shape, and no part of the key they
carry in the body or in any log record (aiohttp's own server and access loggers included)."""

from __future__ import annotations

import logging
import uuid
from typing import Any

import orjson
import pytest
from aiohttp import web

from gateway.app import create_app
from gateway.edge.malformed import install as answer_malformed_requests_in_json
from gateway.edge.middleware import AccessLogger
from gateway.observability.logs import install_redaction
from tests.support.common import User, wait_for
from tests.support.raw_requests import hostile_requests, secret_parts, send_raw


def logged_text(record: logging.LogRecord) -> str:
    """Everything a handler could write of a record: message, extra fields, traceback, stack."""
    parts = [record.getMessage(), record.exc_text or "", record.stack_info or ""]
    if record.exc_info:
        parts.append(logging.Formatter().formatException(record.exc_info))
    parts.extend(repr(value) for value in vars(record).values())
    return "\n".join(parts)


@pytest.fixture
async def gateway_server(aiohttp_server: Any, make_settings: Any) -> Any:
    # the real app, with the access logger `python -m gateway serve` installs
    return await aiohttp_server(create_app(make_settings()), access_log_class=AccessLogger)


@pytest.mark.parametrize("case", list(hostile_requests("gwk_x")))
async def test_a_malformed_request_gets_a_json_400_and_its_key_is_in_no_body_and_no_log(
        case: str, gateway_server: Any, user: User, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.DEBUG)
    status, headers, body = await send_raw(gateway_server, hostile_requests(user.key)[case])

    assert status == 400
    request_id = headers["x-request-id"]
    assert headers["content-type"] == "application/json"
    assert orjson.loads(body) == {"error": {"type": "bad_request", "message": "malformed HTTP request",
                                            "request_id": request_id}}

    def access_line() -> logging.LogRecord | None:
        return next((r for r in caplog.records
                     if r.name == "aiohttp.access" and getattr(r, "request_id", None) == request_id), None)

    async def logged() -> bool:
        return access_line() is not None

    await wait_for(logged)  # aiohttp logs the access line after the response is written
    line = access_line()
    assert line is not None and (line.status, line.route, line.method, line.path) == (400, "malformed", "UNKNOWN", "/")
    errors = [r for r in caplog.records if r.name == "aiohttp.server"]
    assert [r.getMessage() for r in errors] == ["Error handling request from 127.0.0.1"]  # the line is still there
    assert "400, message:" in (errors[0].exc_text or "")  # with its traceback, redacted
    for part in secret_parts(user.key):
        assert part.encode() not in body
        assert part not in caplog.text
        for record in caplog.records:
            assert part not in logged_text(record), (record.name, logged_text(record))


async def test_a_well_formed_request_with_a_token_in_the_query_logs_it_redacted(
        gateway_server: Any, user: User, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.DEBUG)
    message_id = uuid.uuid4()
    request = (f"GET /api/messages/{message_id}/stream?token={user.key}&x=1 HTTP/1.1\r\n"
               f"Host: gw\r\nX-Request-Id: token-in-query\r\nConnection: close\r\n\r\n")
    status, _, _ = await send_raw(gateway_server, request)
    assert status == 401

    async def logged() -> bool:
        return any(getattr(r, "request_id", None) == "token-in-query" for r in caplog.records)

    await wait_for(logged)
    line = next(r for r in caplog.records if getattr(r, "request_id", None) == "token-in-query")
    assert line.name == "aiohttp.access"
    assert line.path == f"/api/messages/{message_id}/stream?token=[redacted]&x=1"
    assert line.getMessage() == (f"token-in-query GET /api/messages/{message_id}/stream?token=[redacted]&x=1 401 "
                                 f"{line.ms:.1f}ms user=-")
    for part in secret_parts(user.key):
        assert all(part not in logged_text(record) for record in caplog.records)


async def test_aiohttp_default_access_log_never_shows_a_key_either(
        aiohttp_server: Any, make_settings: Any, user: User, caplog: pytest.LogCaptureFixture):
    # aiohttp's own access logger (what a host gets without our access_log_class) prints the raw
    # request line and any header it is told to: the filter on its logger cleans both
    server = await aiohttp_server(create_app(make_settings()), access_log_format='%r %s "%{Authorization}i"')
    caplog.set_level(logging.INFO, logger="aiohttp.access")
    status, _, _ = await send_raw(server, f"GET /api/me?token={user.key} HTTP/1.1\r\nHost: gw\r\n"
                                          f"Authorization: Bearer {user.key}\r\nConnection: close\r\n\r\n")
    assert status == 200

    async def logged() -> bool:
        return any(r.name == "aiohttp.access" for r in caplog.records)

    await wait_for(logged)
    [line] = [r.getMessage() for r in caplog.records if r.name == "aiohttp.access"]
    assert line == 'GET /api/me?token=[redacted] HTTP/1.1 200 "Bearer [redacted]"'
    for part in secret_parts(user.key):
        assert all(part not in logged_text(record) for record in caplog.records)


async def test_an_exception_escaping_every_middleware_is_answered_as_json_without_its_text(
        aiohttp_server: Any, user: User, caplog: pytest.LogCaptureFixture):
    # the 500 path of the same aiohttp method: a bare app (no errors middleware) whose handler fails
    async def fail(request: web.Request) -> web.Response:
        raise ValueError(f"bad header {request.headers['Authorization']}")

    install_redaction()  # what create_app does, process-wide
    answer_malformed_requests_in_json()
    app = web.Application()
    app.router.add_get("/fail", fail)
    server = await aiohttp_server(app)
    caplog.set_level(logging.DEBUG)
    status, headers, body = await send_raw(server, f"GET /fail HTTP/1.1\r\nHost: gw\r\n"
                                                   f"Authorization: Bearer {user.key}\r\n\r\n")
    assert status == 500
    assert orjson.loads(body) == {"error": {"type": "internal_error", "message": "internal error",
                                            "request_id": headers["x-request-id"]}}
    [record] = [r for r in caplog.records if r.name == "aiohttp.server"]
    assert record.exc_info is None and "ValueError: bad header Bearer [redacted]" in (record.exc_text or "")
    for part in secret_parts(user.key):
        assert all(part not in logged_text(r) for r in caplog.records)
