"""The gateway as the README's first command runs it: `serve` on uvloop (the `speed` extra). The
upstream client (gateway/providers/http.py) is a raw asyncio Protocol, and uvloop's transports are
not asyncio's classes: a relay that works on the standard loop must be shown to work here too —
streamed replies over one reused keep-alive connection and an upstream error read for its body."""

from __future__ import annotations

import importlib.util

import aiohttp
import orjson
import pytest

from tests.support.common import User
from tests.support.fakes import FakeUpstream, Reply, openai_stream, parse_sse
from tests.support.fleet import GatewayProcess, gateway_env

pytestmark = pytest.mark.processes  # starts processes of its own (see pyproject.toml)

CONFIG = """
[providers.up]
kind = "openai"
base_url = "{url}"
api_key = "k"

[models.relay]
provider = "up"
upstream = "fake-up"
"""


def test_uvloop_is_installed_for_the_tests():
    # the test extra installs it: without it `serve` would quietly run the standard loop
    assert importlib.util.find_spec("uvloop") is not None


async def test_serve_on_uvloop_relays_streams_and_errors(tmp_path, database_url, gateways, config_file,
                                                              upstream: FakeUpstream, user: User):
    env = gateway_env(database_url, GATEWAY_CONFIG=config_file(CONFIG.format(url=upstream.base_url)))
    gw = GatewayProcess(tmp_path / "gw", env)
    gateways.append(gw)
    await gw.ready()
    upstream.queue(Reply(openai_stream(["Hel", "lo"])), Reply(openai_stream([" again"])),
                   Reply(status=500, body=b'{"error": {"message": "boom"}}'))
    body = {"model": "relay", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    async with aiohttp.ClientSession(headers=user.headers) as session:
        texts = []
        for _ in range(2):  # the second rides the first's pooled upstream connection
            async with session.post(gw.url + "/v1/chat/completions", json=body) as resp:
                assert resp.status == 200
                events = parse_sse(await resp.read())
            assert events[-1].data == "[DONE]"
            texts.append("".join(orjson.loads(e.data)["choices"][0]["delta"].get("content") or ""
                                 for e in events[:-1] if orjson.loads(e.data).get("choices")))
        assert texts == ["Hello", " again"]
        # an upstream error before content: the OpenAI door answers with the upstream's failure
        async with session.post(gw.url + "/v1/chat/completions", json={**body, "stream": False}) as resp:
            assert resp.status == 502
            assert "boom" in (await resp.json())["error"]["message"]
    assert len(upstream.requests) == 3
