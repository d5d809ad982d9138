"""Odd Last-Event-ID values: a malformed or foreign id is a 400 on SSE and an error
frame on the WebSocket — never a 500, never a dead socket — and a valid one still resumes exactly."""

from __future__ import annotations

import uuid
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient

from tests.support.arena import accept_arena, demo_models_toml, wait_comparison_finished
from tests.support.chat import accept_chat, wait_finished
from tests.support.common import User
from tests.support.ws import receive, send, until_ends

ODD = [
    "{mid}:²",  # str.isdigit() says yes, int() says no
    "{mid}:" + "9" * 4301,  # past Python's int-string limit
    "{mid}:" + "1" * 10,  # longer than any seq
    "{mid}:-5",
    "{mid}: 3",
    "{mid}:1_000",
    "{mid}:٣",  # an Arabic-Indic three
    "{mid}:",
    "{other}:3",  # another message's id
    "garbage",
]


async def finished_message(client: TestClient, user: User, db: Any) -> str:
    answer = await accept_chat(client, user, content="ids")
    await wait_finished(db, answer["assistant_message_id"])
    return str(answer["assistant_message_id"])


@pytest.mark.parametrize("odd", ODD)
@pytest.mark.parametrize("where", ["header", "query"])
async def test_an_odd_last_event_id_is_a_400_that_names_no_internal_error(
        client: TestClient, user: User, db: Any, odd: str, where: str) -> None:
    mid = await finished_message(client, user, db)
    last = odd.format(mid=mid, other=uuid.uuid4())
    kwargs: dict[str, Any] = ({"headers": {**user.headers, "Last-Event-ID": last}} if where == "header"
                              else {"headers": user.headers, "params": {"lastEventId": last}})
    resp = await client.get(f"/api/messages/{mid}/stream", **kwargs)
    assert resp.status == 400
    body = await resp.json()
    assert body["error"]["type"] == "invalid_request"
    assert "event id" in body["error"]["message"] or "Last-Event-ID" in body["error"]["message"]


async def test_a_valid_last_event_id_still_resumes_exactly_and_minus_one_means_from_the_start(
        client: TestClient, user: User, db: Any) -> None:
    mid = await finished_message(client, user, db)
    whole = await (await client.get(f"/api/messages/{mid}/stream", headers=user.headers)).read()
    ids = [line[4:] for line in whole.split(b"\n") if line.startswith(b"id: ")]
    again = await client.get(f"/api/messages/{mid}/stream", headers={**user.headers, "Last-Event-ID": f"{mid}:-1"})
    assert await again.read() == whole
    after = await client.get(f"/api/messages/{mid}/stream", headers={**user.headers, "Last-Event-ID": f"{mid}:0"})
    body = await after.read()
    assert [line[4:] for line in body.split(b"\n") if line.startswith(b"id: ")] == ids[1:]


@pytest.mark.parametrize("odd", ["{cid}:²:1", "{cid}:1:" + "9" * 4301, "{cid}:1", "{other}:1:1", "{cid}:a:b"])
async def test_an_odd_comparison_event_id_is_a_400(make_client: Any, config_file: Any, user: User, db: Any,
                                                    odd: str) -> None:
    client = await make_client(GATEWAY_CONFIG=config_file(demo_models_toml("m1", "m2")))
    answer = await accept_arena(client, user, content="pair", models=["m1", "m2"])
    cid = answer["comparison_id"]
    await wait_comparison_finished(db, cid)
    resp = await client.get(f"/api/comparisons/{cid}/stream",
                            headers={**user.headers, "Last-Event-ID": odd.format(cid=cid, other=uuid.uuid4())})
    assert resp.status == 400
    assert (await resp.json())["error"]["type"] == "invalid_request"


async def test_an_odd_last_event_id_on_the_websocket_is_an_error_frame_and_the_socket_lives_on(
        client: TestClient, user: User, db: Any) -> None:
    mid = await finished_message(client, user, db)
    async with client.ws_connect("/ws", headers=user.headers) as ws:
        for odd in (f"{mid}:²", f"{mid}:" + "9" * 4301, f"{uuid.uuid4()}:2"):
            await send(ws, type="resume", message_id=mid, last_event_id=odd)
            frame = await receive(ws)
            assert frame["event"] == "error" and frame["data"]["type"] == "invalid_request"
            assert frame["message_id"] == mid
        # the same socket still serves a valid resume, exactly after the given id
        await send(ws, type="resume", message_id=mid, last_event_id=f"{mid}:0")
        frames = await until_ends(ws)
        assert frames[0]["id"] == f"{mid}:1"
        assert frames[-1] == orjson.loads(b'{"event":"end","message_id":"%s"}' % mid.encode())
