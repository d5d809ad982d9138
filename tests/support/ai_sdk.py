"""The `ai` package's chat client (tests/node/client.mjs) run by Node against a test app.

`npm ci` in tests/node installs the package from its lockfile (.ci/run does); without it these fail
and say so. Each command is one Node process printing JSON lines (see the script).
"""

from __future__ import annotations

import asyncio
import json
import shutil
from typing import Any

from aiohttp.test_utils import TestClient

from tests.support.common import REPO_ROOT, User

NODE_DIR = REPO_ROOT / "tests" / "node"
SCRIPT = NODE_DIR / "client.mjs"
API = "/api/ai-sdk/chat"


def user_message(message_id: str, text: str) -> dict[str, Any]:
    return {"id": message_id, "role": "user", "parts": [{"type": "text", "text": text}]}


class NodeRun:
    """One running command: its JSON lines as they come, then its result."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def line(self, timeout: float = 20.0) -> dict[str, Any]:
        assert self.proc.stdout is not None
        raw = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not raw:
            assert self.proc.stderr is not None
            raise AssertionError(f"node ended without a result: {(await self.proc.stderr.read()).decode()}")
        line: dict[str, Any] = json.loads(raw)
        if line["event"] == "failed":
            raise AssertionError(f"node failed: {line}")
        return line

    async def until(self, event: str, timeout: float = 20.0) -> dict[str, Any]:
        while True:
            line = await self.line(timeout)
            if line["event"] == event:
                return line

    async def result(self, timeout: float = 20.0) -> dict[str, Any]:
        line = await self.until("result", timeout)
        await asyncio.wait_for(self.proc.wait(), timeout)
        return line


async def start_node(command: dict[str, Any]) -> NodeRun:
    node = shutil.which("node")
    if node is None:
        raise AssertionError("node is missing: the AI SDK tests run the ai package in Node")
    if not (NODE_DIR / "node_modules" / "ai").is_dir():
        raise AssertionError("the ai package is missing: run `npm ci` in tests/node (.ci/run does)")
    proc = await asyncio.create_subprocess_exec(node, str(SCRIPT), json.dumps(command), cwd=NODE_DIR,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    return NodeRun(proc)


async def run_node(command: dict[str, Any]) -> dict[str, Any]:
    return await (await start_node(command)).result()


def send(client: TestClient, user: User, chat_id: str, messages: list[dict[str, Any]],
         **options: Any) -> dict[str, Any]:
    """A `sendMessages` command for `client`'s gateway."""
    return {"do": "send", "api": str(client.make_url(API)), "headers": user.headers, "chatId": chat_id,
            "messages": messages, **options}


def reconnect(client: TestClient, user: User, chat_id: str) -> dict[str, Any]:
    return {"do": "reconnect", "api": str(client.make_url(API)), "headers": user.headers, "chatId": chat_id}


def validate(client: TestClient, user: User, chat_id: str) -> dict[str, Any]:
    return {"do": "validate", "url": str(client.make_url(f"{API}/{chat_id}/messages")), "headers": user.headers}
