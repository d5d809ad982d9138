"""The AI SDK door through the `ai` package's own client (DefaultChatTransport, readUIMessageStream,
validateUIMessages), run in Node against the real app, a real PostgreSQL and a fake upstream."""

from __future__ import annotations

import pytest

from tests.support.ai_sdk import run, send, user_message
from tests.support.chat import fake_client

pytestmark = pytest.mark.processes  # runs Node (see pyproject.toml)


async def test_probe(make_client, upstream, user, db):
    client = await fake_client(make_client, upstream)
    result = await run(send(client, user, "chat-1", [user_message("u1", "Hi")]))
    print(result)
    assert 0
