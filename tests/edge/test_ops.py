"""The edge: health and readiness, request ids on every response, CORS."""

from __future__ import annotations

import asyncio
import re
from urllib.parse import parse_qs, urlsplit, urlunsplit

import orjson
import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient

from tests.support.common import MakeClient, User
from tests.support.fakes import parse_sse

GENERATED_ID = re.compile(r"[0-9a-f]{32}")
APP_ORIGIN = "https://app.example"


def generated_id(resp: ClientResponse) -> str:
    request_id = resp.headers["X-Request-Id"]
    assert GENERATED_ID.fullmatch(request_id), request_id
    return request_id


async def test_healthz_answers_ok_without_credentials(client: TestClient):
    resp = await client.get("/healthz")
    assert resp.status == 200
    assert resp.content_type == "application/json"
    assert await resp.read() == b'{"status":"ok"}'


async def test_readyz_answers_ok_when_every_migration_is_applied(client: TestClient):
    resp = await client.get("/readyz")
    assert resp.status == 200
    assert await resp.json() == {"status": "ok"}


async def test_json_response_carries_a_generated_request_id(client: TestClient):
    generated_id(await client.get("/healthz"))


async def test_not_found_error_carries_the_request_id_in_header_and_body(client: TestClient):
    resp = await client.get("/no/such/route")
    assert resp.status == 404
    body = await resp.json()
    assert body["error"]["type"] == "not_found"
    assert body["error"]["request_id"] == generated_id(resp)


async def test_unauthorized_error_carries_the_request_id_in_header_and_body(client: TestClient):
    resp = await client.get("/api/threads")
    assert resp.status == 401
    body = await resp.json()
    assert body["error"]["type"] == "unauthorized"
    assert body["error"]["request_id"] == generated_id(resp)


async def test_sse_stream_carries_a_request_id(client: TestClient, user: User):
    resp = await client.post("/api/chat", json={"content": "hi", "stream": True}, headers=user.headers)
    assert resp.status == 200 and resp.content_type == "text/event-stream"
    generated_id(resp)
    assert parse_sse(await resp.read())[-1].data == "[DONE]"


async def test_no_content_response_carries_a_request_id(client: TestClient, user: User):
    created = await client.post("/api/threads", json={"title": "t"}, headers=user.headers)
    assert created.status == 201
    resp = await client.delete(f"/api/threads/{(await created.json())['id']}", headers=user.headers)
    assert resp.status == 204
    assert await resp.read() == b""
    generated_id(resp)


async def test_safe_incoming_request_id_is_echoed(client: TestClient):
    for incoming in ("req-1.a_B", "x" * 64):
        resp = await client.get("/no/such/route", headers={"X-Request-Id": incoming})
        assert resp.headers["X-Request-Id"] == incoming
        assert (await resp.json())["error"]["request_id"] == incoming


@pytest.mark.parametrize("incoming", ["has spaces", "a" * 200, "semi;colon", "x" * 65])
async def test_unsafe_incoming_request_id_is_replaced(client: TestClient, incoming: str):
    resp = await client.get("/healthz", headers={"X-Request-Id": incoming})
    assert generated_id(resp) != incoming


# -- CORS -------------------------------------------------------------------------------------------

def preflight_headers(origin: str) -> dict[str, str]:
    return {"Origin": origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type, x-custom"}


async def preflight(client: TestClient, origin: str) -> ClientResponse:
    return await client.options("/api/chat", headers=preflight_headers(origin))


async def test_preflight_from_listed_origin_is_allowed_with_credentials(make_client: MakeClient):
    client = await make_client(CORS_ORIGINS=APP_ORIGIN)
    resp = await preflight(client, APP_ORIGIN)
    assert resp.status == 204
    assert resp.headers["Access-Control-Allow-Origin"] == APP_ORIGIN
    assert resp.headers["Access-Control-Allow-Credentials"] == "true"
    assert resp.headers["Access-Control-Allow-Methods"] == "GET, POST, DELETE, OPTIONS"
    assert resp.headers["Access-Control-Allow-Headers"] == "authorization, content-type, x-custom"
    assert "Origin" in resp.headers.getall("Vary")
    generated_id(resp)


async def test_request_from_listed_origin_exposes_the_request_id(make_client: MakeClient, user: User):
    client = await make_client(CORS_ORIGINS=APP_ORIGIN)
    resp = await client.get("/api/threads", headers={**user.headers, "Origin": APP_ORIGIN})
    assert resp.status == 200
    assert resp.headers["Access-Control-Allow-Origin"] == APP_ORIGIN
    assert resp.headers["Access-Control-Allow-Credentials"] == "true"
    assert resp.headers.getall("Vary") == ["Origin"]
    assert resp.headers["Access-Control-Expose-Headers"] == "X-Request-Id"


async def test_sse_stream_from_listed_origin_carries_cors_headers(make_client: MakeClient, user: User):
    client = await make_client(CORS_ORIGINS=APP_ORIGIN)
    resp = await client.post("/api/chat", json={"content": "hi", "stream": True},
                             headers={**user.headers, "Origin": APP_ORIGIN})
    assert resp.status == 200
    assert resp.headers["Access-Control-Allow-Origin"] == APP_ORIGIN
    assert resp.headers["Access-Control-Allow-Credentials"] == "true"
    await resp.read()


async def test_unlisted_origin_is_refused(make_client: MakeClient, user: User):
    client = await make_client(CORS_ORIGINS=APP_ORIGIN)
    resp = await preflight(client, "https://evil.example")
    assert resp.status == 403
    assert "Access-Control-Allow-Origin" not in resp.headers
    assert (await resp.json())["error"]["type"] == "forbidden"
    resp = await client.get("/api/threads", headers={**user.headers, "Origin": "https://evil.example"})
    assert resp.status == 200  # CORS is the browser's to enforce; the response just grants nothing
    assert "Access-Control-Allow-Origin" not in resp.headers
    assert "Access-Control-Allow-Credentials" not in resp.headers


async def test_no_cors_origins_allows_no_origin(client: TestClient, user: User):
    resp = await preflight(client, APP_ORIGIN)
    assert resp.status == 403
    assert "Access-Control-Allow-Origin" not in resp.headers
    resp = await client.get("/api/threads", headers={**user.headers, "Origin": APP_ORIGIN})
    assert "Access-Control-Allow-Origin" not in resp.headers


async def test_configured_wildcard_allows_any_origin_without_credentials(make_client: MakeClient, user: User):
    client = await make_client(CORS_ORIGINS="*")
    resp = await preflight(client, "https://anyone.example")
    assert resp.status == 204
    assert resp.headers["Access-Control-Allow-Origin"] == "*"
    assert "Access-Control-Allow-Credentials" not in resp.headers
    assert resp.headers["Access-Control-Allow-Headers"] == "authorization, content-type, x-custom"
    resp = await client.get("/api/threads", headers={**user.headers, "Origin": "https://anyone.example"})
    assert resp.headers["Access-Control-Allow-Origin"] == "*"
    assert "Access-Control-Allow-Credentials" not in resp.headers
    assert resp.headers["Access-Control-Expose-Headers"] == "X-Request-Id"


async def test_listed_origin_beside_wildcard_keeps_its_credentials(make_client: MakeClient, user: User):
    client = await make_client(CORS_ORIGINS=f"{APP_ORIGIN}, *")
    resp = await preflight(client, APP_ORIGIN)
    assert resp.status == 204
    assert resp.headers["Access-Control-Allow-Origin"] == APP_ORIGIN
    assert resp.headers["Access-Control-Allow-Credentials"] == "true"
    resp = await client.get("/api/threads", headers={**user.headers, "Origin": APP_ORIGIN})
    assert resp.headers["Access-Control-Allow-Origin"] == APP_ORIGIN
    assert resp.headers["Access-Control-Allow-Credentials"] == "true"
    other = await client.get("/api/threads", headers={**user.headers, "Origin": "https://other.example"})
    assert other.headers["Access-Control-Allow-Origin"] == "*"
    assert "Access-Control-Allow-Credentials" not in other.headers
    assert orjson.loads(await other.read()) == {"threads": [], "next_cursor": None}


async def test_readyz_says_in_words_why_the_database_is_unavailable(make_client: MakeClient, database_url: str):
    # the gateway reaches the test database through a relay, which then stops: connections refused
    target = urlsplit(database_url)
    relays: list[asyncio.StreamWriter] = []

    socket_dir = parse_qs(target.query).get("host", [""])[0]  # the embedded server: a Unix socket only

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if socket_dir.startswith("/"):
            up_reader, up_writer = await asyncio.open_unix_connection(f"{socket_dir}/.s.PGSQL.{target.port or 5432}")
        else:
            up_reader, up_writer = await asyncio.open_connection(target.hostname, target.port or 5432)
        relays.extend((writer, up_writer))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            while data := await src.read(65536):
                dst.write(data)
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer), return_exceptions=True)

    server = await asyncio.start_server(relay, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = await make_client(DATABASE_URL=urlunsplit(target._replace(netloc=f"{target.username}@127.0.0.1:{port}",
                                                                       query="")))
    assert (await client.get("/readyz")).status == 200

    server.close()
    await server.wait_closed()
    for writer in relays:
        writer.close()
    await asyncio.sleep(0.1)  # the pool sees its connections close
    resp = await client.get("/readyz")
    assert (resp.status, await resp.json()) == (503, {"status": "unavailable", "database": "connection refused"})
