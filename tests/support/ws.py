"""A WebSocket client for the native socket door."""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson
from aiohttp import WSMsgType

Socket = aiohttp.ClientWebSocketResponse


async def send(ws: Socket, **frame: Any) -> None:
    await ws.send_str(orjson.dumps(frame).decode())


async def receive_raw(ws: Socket) -> str:
    msg = await ws.receive(timeout=5)
    assert msg.type is WSMsgType.TEXT, msg
    return msg.data


async def receive(ws: Socket) -> dict[str, Any]:
    return orjson.loads(await receive_raw(ws))


async def until_ends(ws: Socket, ends: int = 1) -> list[dict[str, Any]]:
    """Every frame up to and including the `ends`-th end frame."""
    frames: list[dict[str, Any]] = []
    while ends:
        frames.append(await receive(ws))
        ends -= frames[-1].get("event") == "end"
    return frames


def end(mid: str) -> dict[str, Any]:
    return {"event": "end", "message_id": mid}
