"""The property: whatever an upstream sends, the client gets exactly one terminal
event, the row ends terminal, the usage is counted exactly once and lies in [0, 2^31), and the
next start of the gateway succeeds.

Hypothesis draws the upstream's reply: content values of any JSON type (text with NUL, numbers of
any size, NaN, objects, lists, booleans, null), optional bytes that are not UTF-8, and usage
counts of any type and size. Each example runs the real app against a real fake upstream on
loopback and real PostgreSQL, then starts the app again on the same data directory.
"""

from __future__ import annotations

import asyncio
import json
import socket
import uuid
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.app import create_app
from gateway.config import Settings
from gateway.store.db import create_pool
from gateway.store.keys import create_user_with_key
from tests.support.fakes import openai_chunk, parse_sse
from tests.support.hostile import DONE, raw_chunk, usage_chunk

INT4 = 2**31

json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True),
              st.text(max_size=12), st.sampled_from(["a\x00b", "\x00", "ok"])),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner, max_size=3)),
    max_leaves=6)
contents = st.lists(st.one_of(st.text(max_size=16), json_values), max_size=6)
counts = st.one_of(st.integers(-(2**70), 2**70), json_values)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def reply_pieces(values: list[Any], not_utf8: bool, prompt: Any, completion: Any) -> list[bytes]:
    pieces = [openai_chunk({"role": "assistant", "content": ""})]
    pieces += [raw_chunk(json.dumps(v).encode()) for v in values]
    if not_utf8:
        pieces.append(raw_chunk(b'"caf\xc3"'))  # a cut multi-byte character
    return [*pieces, openai_chunk({}, "stop"), usage_chunk(prompt, completion), DONE]


async def scenario(database_url: str, data_dir: Path, pieces: list[bytes]) -> None:
    async def chat(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for piece in pieces:
            await resp.write(piece)
        await resp.write_eof()
        return resp

    upstream = web.Application()
    upstream.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(upstream)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    env = {"DATABASE_URL": database_url, "GATEWAY_DATA_DIR": str(data_dir), "BOOTSTRAP_ADMIN_KEY": "false",
           "DB_POOL_MIN": "1", "OPENAI_BASE_URL": f"http://127.0.0.1:{port}/v1", "OPENAI_MODEL": "fake",
           "OPENAI_API_KEY": "sk-test", "FINISH_RETRY_S": "1"}
    pool = await create_pool(database_url, min_size=1, max_size=2)
    try:
        user_id = uuid.uuid4()
        _, key = await create_user_with_key(pool, "prop", ["chat"], user_id)
        client = TestClient(TestServer(create_app(Settings.from_env(env))))
        await client.start_server()
        try:
            resp = await client.post("/api/chat", json={"content": "hi", "stream": True},
                                     headers={"Authorization": f"Bearer {key}"})
            assert resp.status == 200
            events = parse_sse(await resp.read())
        finally:
            await client.close()
        assert events[-1].data == "[DONE]"
        terminal = [e for e in events if e.event in ("done", "error")]
        assert len(terminal) == 1 and events[-2] is terminal[0]
        message_id = uuid.UUID(orjson.loads(events[0].data)["message_id"])
        row = await pool.fetchrow("SELECT status FROM messages WHERE id = $1", message_id)
        assert row["status"] in ("complete", "failed")
        usage = await pool.fetch("SELECT prompt_tokens, completion_tokens, total_tokens FROM usage "
                                 "WHERE message_id = $1", message_id)
        assert len(usage) == 1
        assert all(0 <= usage[0][c] < INT4 for c in ("prompt_tokens", "completion_tokens", "total_tokens"))
        day = await pool.fetchrow("SELECT tokens, reserved FROM daily_usage WHERE user_id = $1", user_id)
        assert day["tokens"] == usage[0]["total_tokens"] and day["reserved"] == 0

        # the next start succeeds, and leaves nothing waiting in the journal
        again = TestClient(TestServer(create_app(Settings.from_env(env))))
        await again.start_server()
        try:
            assert (await again.get("/readyz")).status == 200
        finally:
            await again.close()
        assert sorted((data_dir / "journal").glob("*.jsonl")) == []
    finally:
        await pool.close()
        await runner.cleanup()


@settings(max_examples=20, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(values=contents, not_utf8=st.booleans(), prompt=counts, completion=counts)
def test_any_upstream_reply_ends_once_is_counted_once_and_the_next_start_succeeds(
        database_url: str, tmp_path_factory: Any, values: list[Any], not_utf8: bool, prompt: Any,
        completion: Any) -> None:
    data_dir = tmp_path_factory.mktemp("prop")
    # its own event loop: hypothesis calls this function once per example
    asyncio.run(scenario(database_url, data_dir, reply_pieces(values, not_utf8, prompt, completion)))

