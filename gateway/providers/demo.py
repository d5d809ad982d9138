"""The built-in demo provider: a deterministic reply derived from the prompt, at a set pace.

It lets the quickstart stream something real end to end with no provider key, and gives the
tests a provider whose every byte is known in advance.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncGenerator

from gateway.config import ModelConfig, ProviderConfig
from gateway.providers.base import Batch, ChatRequest, Finish, TextDelta, UsageReport, estimate_tokens, text_of

_WORDS = ("stream", "token", "gateway", "reply", "river", "signal", "packet", "model", "quiet", "bright",
          "steady", "chunk", "answer", "light", "echo", "thread", "message", "swift", "careful", "whole")


def last_user_text(request: ChatRequest) -> str:
    for message in reversed(request.messages):
        content = message.get("content")
        if message.get("role") == "user" and isinstance(content, (str, list)):
            return text_of(content)  # of content parts: the demo answers about their text
    return ""


def demo_reply(prompt: str, chunks: int, variant: str = "demo") -> list[str]:
    """The reply's chunks: an echo of the prompt's start, then words drawn from its hash (and the
    model's upstream id, so that two demo models answer differently side by side)."""
    seed = prompt if variant == "demo" else variant + "\0" + prompt
    digest = hashlib.sha256(seed.encode()).digest()
    head = " ".join(prompt.split()[:6])
    parts = [f"Demo reply to \"{head}\":"]
    for i in range(max(chunks - 1, 0)):
        parts.append(" " + _WORDS[digest[i % len(digest)] % len(_WORDS)])
    parts[-1] += "."
    return parts[:chunks]


class DemoProvider:
    def __init__(self, config: ProviderConfig) -> None:
        self.name = config.name
        self._chunks = config.demo_chunks
        self._delay = config.demo_delay_s

    async def stream(self, model: ModelConfig, request: ChatRequest) -> AsyncGenerator[Batch, None]:
        prompt = last_user_text(request)
        chunks = demo_reply(prompt, self._chunks, model.upstream)
        if request.max_tokens is not None:
            chunks = chunks[:max(request.max_tokens, 1)]
        for i, text in enumerate(chunks):
            if self._delay and i:
                await asyncio.sleep(self._delay)
            yield [TextDelta(text)]  # one chunk per "read", like a real token stream
        truncated = request.max_tokens is not None and len(chunks) < self._chunks
        prompt_tokens = sum(estimate_tokens(text_of(m.get("content"))) for m in request.messages)
        yield [Finish("length" if truncated else "stop"), UsageReport(prompt_tokens, len(chunks))]
