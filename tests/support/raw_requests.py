"""Hostile raw HTTP requests sent over a socket."""

from __future__ import annotations

import asyncio
from typing import Any

PAD = "a" * 9000  # past aiohttp's 8190-byte limit for a request line or a header


def hostile_requests(key: str) -> dict[str, str]:
    """Each request carries the key where aiohttp's parser error would quote it."""
    return {
        "control character in Authorization": f"GET /api/me HTTP/1.1\r\nHost: gw\r\n"
                                              f"Authorization: Bearer {key[:20]}\x01{key[20:]}\r\n\r\n",
        "stray CR in a header": f"GET /api/me HTTP/1.1\r\nHost: gw\r\n"
                                f"Authorization: Bearer {key[:20]}\r{key[20:]}\r\n\r\n",
        "obs-fold continuation carrying the key": f"GET /api/me HTTP/1.1\r\nHost: gw\r\nX-Note: hello\r\n"
                                                  f" Bearer {key}\r\n\r\n",
        "HTTP/9.9": f"GET /api/me?token={key} HTTP/9.9\r\nHost: gw\r\nAuthorization: Bearer {key}\r\n\r\n",
        "9 KB URL with ?token=": f"GET /api/me?token={key}&pad={PAD} HTTP/1.1\r\nHost: gw\r\n\r\n",
        "overlong header": f"GET /api/me HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {key} {PAD}\r\n\r\n",
    }


async def send_raw(server: Any, request: str) -> tuple[int, dict[str, str], bytes]:
    """Write `request` as is to a server with `host` and `port`, read until it closes; the status,
    headers and body."""
    reader, writer = await asyncio.open_connection(server.host, server.port)
    try:
        writer.write(request.encode("latin-1"))
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 10)  # the server closes after a malformed request
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value for name, _, value in (line.partition(": ") for line in lines)}
    return int(status_line.split(" ")[1]), headers, body


def secret_parts(key: str) -> tuple[str, str]:
    """What must never show: the key's secret part after `gwk_`, its head and its tail."""
    return key[4:20], key[-16:]
