"""Anthropic Messages API (`POST /v1/messages`, streaming), normalised to deltas + usage.

Differences from OpenAI that matter here: the system prompt is a top-level field, `max_tokens`
is required, input tokens come in `message_start` and output tokens cumulatively in
`message_delta`, and the stream ends with `message_stop` (a stream without it is truncated).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

import aiohttp
import orjson

from gateway.config import ModelConfig, ProviderConfig
from gateway.observability.tracing import upstream_headers
from gateway.providers import normalise
from gateway.providers.base import (
    NO_SECRETS,
    Batch,
    ChatRequest,
    Finish,
    ProviderError,
    Secrets,
    StreamEvent,
    TextDelta,
    UpstreamProtocolError,
    UpstreamStreamError,
)
from gateway.providers.http import Upstream
from gateway.providers.openai import answer_error, request_headers
from gateway.providers.sse_decoder import SSEDecoder

API_VERSION = "2023-06-01"
DEFAULT_MAX_TOKENS = 4096  # required by the API; used when the request names none
STOP_REASONS = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length", "tool_use": "tool_calls"}


def content_blocks(content: Any) -> Any:
    """OpenAI-style content parts as Anthropic content blocks: text as text; an image_url's data URL
    as a base64 image source, an http(s) URL as a url source. A string stays a string."""
    if not isinstance(content, list):
        return content
    blocks: list[Any] = []
    for part in content:
        image = part.get("image_url") if isinstance(part, dict) and part.get("type") == "image_url" else None
        url = image.get("url") if isinstance(image, dict) else None
        if not isinstance(url, str):
            blocks.append(part)  # text parts are the same in both APIs; anything else is the upstream's to judge
        elif url.startswith("data:"):  # data:<media type>;base64,<data>
            media_type, _, data = url[len("data:"):].partition(";base64,")
            blocks.append({"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}})
        else:
            blocks.append({"type": "image", "source": {"type": "url", "url": url}})
    return blocks


def to_anthropic(model: ModelConfig, request: ChatRequest) -> dict[str, Any]:
    system = [str(m.get("content", "")) for m in request.messages if m.get("role") == "system"]
    body: dict[str, Any] = {
        "model": model.upstream,
        "max_tokens": request.max_tokens or DEFAULT_MAX_TOKENS,
        "messages": [{"role": m["role"], "content": content_blocks(m.get("content", ""))} for m in request.messages
                     if m.get("role") in ("user", "assistant")],
        "stream": True,
    }
    if system:
        body["system"] = "\n\n".join(system)
    if request.temperature is not None:
        body["temperature"] = request.temperature
    if request.top_p is not None:
        body["top_p"] = request.top_p
    if request.stop is not None:
        body["stop_sequences"] = [request.stop] if isinstance(request.stop, str) else list(request.stop)
    return body


class AnthropicProvider:
    def __init__(self, config: ProviderConfig, session: aiohttp.ClientSession) -> None:
        self.name = config.name
        self._url = config.base_url + "/messages"
        own = {"Content-Type": "application/json", "Accept": "text/event-stream", "anthropic-version": API_VERSION}
        if config.api_key:
            own["x-api-key"] = config.api_key.reveal()
        self._headers = request_headers(config, own)
        self._secrets = Secrets.of(config)
        # the session is not used for chat: the lean client (providers/http.py) keeps a held stream small
        self._upstream = Upstream(config.base_url)

    def close(self) -> None:
        self._upstream.close()

    async def stream(self, model: ModelConfig, request: ChatRequest) -> AsyncGenerator[Batch, None]:
        state = _Usage()
        conn = await self._upstream.post("/messages", upstream_headers(self._headers),
                                         orjson.dumps(to_anthropic(model, request)),
                                         connect_timeout_s=model.connect_timeout_s,
                                         idle_timeout_s=model.idle_timeout_s)
        finished = False  # the connection went back to the pool: never close it from here
        try:
            if conn.status >= 300:
                refused = await answer_error(conn, self._secrets)
                finished = True
                raise refused
            decoder = SSEDecoder()
            while True:
                chunk = conn.take()
                if chunk is None:
                    await conn.readable()  # a bare future: a held stream keeps no read frame
                    continue
                if not chunk:
                    break
                batch, error = read_events(decoder, chunk, state, self._secrets)
                if state.stopped:
                    conn.finish()  # the body's end is drained off the caller's path
                    finished = True
                if batch:  # what arrived before a failure is part of the reply
                    yield batch
                if error is not None:
                    raise error
                if state.stopped:
                    return
                del batch  # between reads a held stream keeps no events (nor the bytes they came from)
            conn.finish()
            finished = True
        finally:
            if not finished:
                conn.close()
        raise UpstreamProtocolError("upstream stream ended without message_stop")


class _Usage:
    __slots__ = ("input", "output", "suspect", "stopped")

    def __init__(self) -> None:
        self.input = 0
        self.output = 0
        self.suspect = False  # a count had to be clamped (see normalise.count)
        self.stopped = False

    def count(self, value: object) -> int:
        n, bad = normalise.count(value)
        self.suspect |= bad
        return n


def read_events(decoder: SSEDecoder, chunk: bytes, state: _Usage,
                secrets: Secrets = NO_SECRETS) -> tuple[Batch, ProviderError | None]:
    """The events of one upstream read, up to message_stop: (the batch, the failure that stopped it)."""
    batch: Batch = []
    for event in decoder.feed(chunk):
        try:
            batch.extend(parse_event(event.event, event.data, state, secrets))
        except ProviderError as e:
            return batch, e
        if state.stopped:
            break
    return batch, None


def parse_event(name: str, data: bytes, state: _Usage, secrets: Secrets = NO_SECRETS) -> list[StreamEvent]:
    """One event into normalised events, checked as `normalise` says (text a string without NUL,
    counts that fit the usage columns, an error's text scrubbed of the provider's `secrets`); an
    event that breaks the format is an `UpstreamProtocolError`."""
    try:
        obj = normalise.loads(data)
    except orjson.JSONDecodeError:
        raise UpstreamProtocolError("upstream sent an event that is not JSON") from None
    if not isinstance(obj, dict):
        raise UpstreamProtocolError("upstream sent an event that is not a JSON object")
    kind = obj.get("type", name)
    if kind == "content_block_delta":
        delta = normalise.obj(obj.get("delta"), "`delta`")
        if delta.get("type") == "text_delta":
            text = normalise.text(delta.get("text"), "`delta.text`")
            if text:
                return [TextDelta(text)]
    elif kind == "message_start":
        usage = normalise.obj(normalise.obj(obj.get("message"), "`message`").get("usage"), "`usage`")
        state.input = state.count(usage.get("input_tokens"))
        state.output = state.count(usage.get("output_tokens"))
    elif kind == "message_delta":
        # output_tokens here is cumulative: it replaces, never adds
        output = normalise.obj(obj.get("usage"), "`usage`").get("output_tokens")
        if output is not None:
            state.output = state.count(output)
        reason = normalise.label(normalise.obj(obj.get("delta"), "`delta`").get("stop_reason"), "`stop_reason`")
        if reason:
            return [Finish(STOP_REASONS.get(reason, reason))]
    elif kind == "message_stop":
        state.stopped = True
        report = normalise.usage(state.input, state.output)  # the sum must fit too
        report.suspect |= state.suspect
        return [report]
    elif kind == "error":
        err = obj.get("error")
        err = err if isinstance(err, dict) else {"message": err}
        raise UpstreamStreamError(normalise.error_text(
            f"upstream error mid-stream: {err.get('type')}: {err.get('message')}", secrets))
    # ping, content_block_start/stop and event types added later are tolerated
    return []
