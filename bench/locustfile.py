"""Locust users that chat with the gateway over SSE and time each reply twice.

    pip install locust
    BENCH_API_KEY=gwk_... locust -f bench/locustfile.py --host http://127.0.0.1:8080 \
        --headless -u 50 -r 10 -t 1m

Every reply becomes two locust entries, fired by hand once its stream is read:
  chat TTFT   from the start of the POST to the first content event
  chat total  from the start of the POST to the end of the body (`data: [DONE]` seen)
Their type column names the route: `native` is `POST /api/chat` with `"stream": true` (the
gateway's own SSE), `openai` is `POST /v1/chat/completions` with `"stream": true` (OpenAI chunks).
A reply fails (in both entries where it applies) on a non-200 status, an error event, no
content, or a body that ends before `data: [DONE]`.

Settings from the environment: BENCH_API_KEY (required), BENCH_MODEL (default: the gateway's
default model), BENCH_PROMPT, BENCH_MAX_TOKENS (optional), BENCH_TIMEOUT_S (default 120).
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from typing import Any

import requests
from locust import User, between, task

API_KEY = os.environ.get("BENCH_API_KEY", "")
MODEL = os.environ.get("BENCH_MODEL") or None
PROMPT = os.environ.get("BENCH_PROMPT", "Explain server-sent events in three sentences.")
MAX_TOKENS = int(os.environ["BENCH_MAX_TOKENS"]) if os.environ.get("BENCH_MAX_TOKENS") else None
TIMEOUT_S = float(os.environ.get("BENCH_TIMEOUT_S", "120"))


if not API_KEY:
    sys.exit("set BENCH_API_KEY to a gateway API key (python -m gateway keys create --name bench)")


class ReplyFailed(Exception):
    """What went wrong with one streamed reply (shown in locust's failures table)."""


class StreamReader:
    """Finds, in a growing SSE body, the first content event, an error event and `data: [DONE]`.

    Events are split on the blank line that ends each one, so an event cut across network reads
    is judged only once it is whole."""

    def __init__(self, route: str) -> None:
        self.route = route
        self.buffer = b""
        self.content = False
        self.done = False
        self.error: str | None = None

    def feed(self, data: bytes) -> bool:
        """Take the next bytes; True once the first content event has been seen."""
        self.buffer += data
        *events_, self.buffer = self.buffer.replace(b"\r\n", b"\n").split(b"\n\n")
        for event in events_:
            self.event(event)
        return self.content

    def event(self, raw: bytes) -> None:
        name, data = b"message", []
        for line in raw.split(b"\n"):
            if line.startswith(b"event:"):
                name = line[6:].strip()
            elif line.startswith(b"data:"):
                data.append(line[5:].strip())
        payload = b"\n".join(data)
        if not data:
            return  # retry: line or a keep-alive comment
        if payload == b"[DONE]":
            self.done = True
        elif name == b"error":
            self.error = json.loads(payload).get("message", "error event")
        elif self.route == "native":
            if name == b"message" and b'"delta"' in payload:
                self.content = True
        else:
            body = json.loads(payload)
            if "error" in body:
                self.error = str(body["error"].get("message", body["error"]))
            elif any(c.get("delta", {}).get("content") for c in body.get("choices", ())):
                self.content = True


def error_message(resp: requests.Response) -> str:
    """The error's message alone (no request id), so that locust groups equal failures."""
    try:
        error = resp.json()["error"]
        return str(error.get("message", error)) if isinstance(error, dict) else str(error)
    except (ValueError, KeyError, TypeError):
        return resp.text[:200]


class ChatUser(User):
    """One person chatting: a streamed question on either route, a short pause, again."""

    wait_time = between(0.5, 2.0)

    def on_start(self) -> None:
        self.http = requests.Session()
        self.http.headers.update({"Authorization": f"Bearer {API_KEY}", "Accept": "text/event-stream"})

    def on_stop(self) -> None:
        self.http.close()

    @task
    def native_chat(self) -> None:
        body: dict[str, Any] = {"content": PROMPT, "stream": True, "client_message_id": uuid.uuid4().hex}
        if MODEL:
            body["model"] = MODEL
        if MAX_TOKENS:
            body["max_tokens"] = MAX_TOKENS
        self.stream("native", "/api/chat", body)

    @task
    def openai_chat(self) -> None:
        body: dict[str, Any] = {"model": MODEL or "auto", "stream": True, "stream_options": {"include_usage": True},
                                "messages": [{"role": "user", "content": PROMPT}]}
        if MAX_TOKENS:
            body["max_tokens"] = MAX_TOKENS
        self.stream("openai", "/v1/chat/completions", body)

    def stream(self, route: str, path: str, body: dict[str, Any]) -> None:
        reader = StreamReader(route)
        length = 0
        ttft_ms: float | None = None
        failure: Exception | None = None
        start = time.perf_counter()
        try:
            with self.http.post(self.host.rstrip("/") + path, json=body, stream=True, timeout=TIMEOUT_S) as resp:
                if resp.status_code != 200:
                    raise ReplyFailed(f"HTTP {resp.status_code}: {error_message(resp)}")
                # chunk_size=None hands over each read as it arrives, so the first token is timed
                # when it reaches us, not when a buffer fills
                for data in resp.iter_content(chunk_size=None):
                    length += len(data)
                    if reader.feed(data) and ttft_ms is None:
                        ttft_ms = (time.perf_counter() - start) * 1000
                        self.fire(route, "chat TTFT", ttft_ms, length)
            if reader.error is not None:
                raise ReplyFailed(f"error event: {reader.error}")
            if not reader.content:
                raise ReplyFailed("no content event")
            if not reader.done:
                raise ReplyFailed("the stream ended before data: [DONE]")
        except (ReplyFailed, requests.RequestException, ValueError) as e:
            failure = e
        total_ms = (time.perf_counter() - start) * 1000
        if ttft_ms is None:
            self.fire(route, "chat TTFT", total_ms, length, failure or ReplyFailed("no content event"))
        self.fire(route, "chat total", total_ms, length, failure)

    def fire(self, route: str, name: str, ms: float, length: int, exception: Exception | None = None) -> None:
        self.environment.events.request.fire(request_type=route, name=name, response_time=ms,
                                             response_length=length, exception=exception, context={})
