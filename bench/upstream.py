"""A fast fake OpenAI-compatible upstream for the benchmark (loopback only).

    POST /v1/chat/completions  stream=true -> SSE `chat.completion.chunk` events: a role chunk,
                               N content chunks, a stop chunk, a usage chunk when the request asks
                               for `stream_options.include_usage`, then `data: [DONE]`
                               stream=false -> one `chat.completion` JSON
    GET  /v1/models            -> model list (also the readiness probe)

Replies are prebuilt bytes, cached per (model, include_usage): a request costs one JSON parse
of its body and one write per SSE event (one send per event, like a real token stream), so
the upstream stays far cheaper than anything put in front of it.

    python bench/upstream.py --port 18000 --chunks 64 [--first-delay-ms 0] [--chunk-delay-ms 0]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource

from aiohttp import web

PROMPT_TOKENS = 16  # fixed: the fake does not tokenize the prompt
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def chunk_text(size: int, i: int) -> str:
    return chr(97 + i % 26) * size  # "aaaa", "bbbb", ...


def build_stream(model: str, chunks: int, size: int, include_usage: bool) -> list[bytes]:
    """Every SSE event of one streamed reply, as bytes."""
    head = (b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1700000000,"model":'
            + json.dumps(model).encode() + b',"choices":[')
    tail = b'],"usage":null}\n\n' if include_usage else b"]}\n\n"

    def choice(delta: bytes, finish: bytes = b"null") -> bytes:
        return head + b'{"index":0,"delta":' + delta + b',"finish_reason":' + finish + b"}" + tail

    events = [choice(b'{"role":"assistant","content":""}')]
    events += [choice(b'{"content":' + json.dumps(chunk_text(size, i)).encode() + b"}") for i in range(chunks)]
    events.append(choice(b"{}", b'"stop"'))
    if include_usage:
        usage = {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": chunks, "total_tokens": PROMPT_TOKENS + chunks}
        events.append(head + b'],"usage":' + json.dumps(usage, separators=(",", ":")).encode() + b"}\n\n")
    events.append(b"data: [DONE]\n\n")
    return events


def build_full(model: str, chunks: int, size: int) -> bytes:
    text = "".join(chunk_text(size, i) for i in range(chunks))
    return json.dumps({
        "id": "chatcmpl-bench", "object": "chat.completion", "created": 1700000000, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": chunks, "total_tokens": PROMPT_TOKENS + chunks},
    }, separators=(",", ":")).encode()


class Upstream:
    def __init__(self, args: argparse.Namespace) -> None:
        self.a = args
        self.cache: dict[tuple, object] = {}

    def cached(self, key: tuple, build):
        value = self.cache.get(key)
        if value is None:
            value = build()
            if len(self.cache) < 64:  # bounded: model names come from clients
                self.cache[key] = value
        return value

    async def chat(self, request: web.Request) -> web.StreamResponse:
        a = self.a
        try:
            body = json.loads(await request.read())
            model = str(body.get("model", "bench-model"))
        except (ValueError, AttributeError):
            return web.json_response({"error": {"message": "bad json", "type": "invalid_request_error"}}, status=400)
        if a.first_delay_ms:
            await asyncio.sleep(a.first_delay_ms / 1000)
        if not body.get("stream"):
            await asyncio.sleep(a.chunk_delay_ms * max(a.chunks - 1, 0) / 1000)
            return web.Response(body=self.cached(("full", model), lambda: build_full(model, a.chunks, a.chunk_size)),
                                content_type="application/json")
        usage = bool((body.get("stream_options") or {}).get("include_usage"))
        events = self.cached(("sse", model, usage), lambda: build_stream(model, a.chunks, a.chunk_size, usage))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        try:
            for i, event in enumerate(events):
                await resp.write(event)
                if a.chunk_delay_ms and 1 <= i < a.chunks:  # between content chunks only
                    await asyncio.sleep(a.chunk_delay_ms / 1000)
            await resp.write_eof()
        except ConnectionResetError:
            pass  # the client went away
        return resp

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": "bench-model", "object": "model", "created": 1700000000, "owned_by": "bench"}]})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=18000)
    p.add_argument("--chunks", type=int, default=64, help="content chunks per reply")
    p.add_argument("--chunk-size", type=int, default=4, help="characters per content chunk")
    p.add_argument("--first-delay-ms", type=float, default=0, help="pause before the first event")
    p.add_argument("--chunk-delay-ms", type=float, default=0, help="pause between content chunks")
    a = p.parse_args()
    if a.host not in LOOPBACK:
        p.error("loopback only")
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    up = Upstream(a)
    app = web.Application()
    app.router.add_post("/v1/chat/completions", up.chat)
    app.router.add_get("/v1/models", up.models)
    web.run_app(app, host=a.host, port=a.port, access_log=None, print=None, backlog=4096)


if __name__ == "__main__":
    main()
