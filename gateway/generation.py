"""Execute: one assistant reply as a task the app owns, its event log, and its single finish write.

A generation runs to its end whatever its listeners do: a client that disconnects stops
nothing, and the reply is saved exactly once. Its events are kept as pre-encoded SSE frames
(index = event seq), so any number of listeners can replay from any point and follow live;
a slow listener only reads later, it never holds the generation up.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from dataclasses import dataclass, field, fields
from datetime import date
from typing import Any, AsyncIterator, Awaitable, Callable

import asyncpg

from .config import ModelConfig
from .durability import FinishWriter
from .policy import Admission, utc_now
from .providers.base import ChatRequest, Finish, ProviderError, TextDelta, UsageReport, estimate_tokens
from .providers.chain import Attempt, Chain
from .sse import FrameEncoder
from .store.messages import FinishRecord
from .store.usage import UsageRecord

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Turn:
    """Who and what a generation is for (the persist step's output, the decide step's choice)."""

    user_id: uuid.UUID
    api_key_id: uuid.UUID | None
    thread_id: uuid.UUID
    user_message_id: uuid.UUID
    message_id: uuid.UUID
    category: str | None = None
    auto: bool = False
    extra_metadata: dict[str, Any] = field(default_factory=dict)
    admission: Admission | None = None  # the policy's grant: reservations to settle at the finish
    slot: str | None = None  # arena slot "a" / "b"
    anonymous: bool = False  # an anonymous arena slot: events do not name the model


class EventLog:
    """A generation's events by seq, in bounded memory.

    The newest frames are kept as bytes for the live listeners; older delta frames are
    re-encoded on demand from the reply's text chunks (kept anyway, for the final save), so a
    long reply costs its text, not a list of every frame it ever sent.
    """

    RECENT = 128

    def __init__(self, encoder: FrameEncoder, parts: list[str]) -> None:
        self._encoder = encoder
        self._parts = parts
        self._recent: deque[bytes] = deque(maxlen=self.RECENT)
        self._metadata = b""
        self.count = 0  # events so far; the next one gets this seq

    def append(self, frame: bytes) -> None:
        if self.count == 0:
            self._metadata = frame
        self._recent.append(frame)
        self.count += 1

    def between(self, start: int, end: int) -> list[bytes]:
        """Frames with seq in [start, end)."""
        first_recent = self.count - len(self._recent)
        out = [self._old(seq) for seq in range(start, min(end, first_recent))]
        out.extend(self._recent[seq - first_recent] for seq in range(max(start, first_recent), end))
        return out

    def _old(self, seq: int) -> bytes:
        # only metadata (seq 0) and deltas (1..n) can have left the recent window: the closing
        # usage/done/error frames are always the newest
        return self._metadata if seq == 0 else self._encoder.delta(seq, self._parts[seq - 1])


class Generation:
    def __init__(self, turn: Turn, chain: Chain, request: ChatRequest, pool: asyncpg.Pool,
                 save: Callable[[FinishRecord], Awaitable[None]]) -> None:
        self.turn = turn
        self.chain = chain
        self.request = request
        self._pool = pool
        self._save = save
        self.parts: list[str] = []  # the reply's text chunks: delta seq k is parts[k - 1]
        self._encoder = FrameEncoder(str(turn.message_id), turn.slot)
        self.log = EventLog(self._encoder, self.parts)
        self.finished = False
        self.status = "streaming"
        self.task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()
        self._cancel_status = "interrupted"  # what a cancellation is saved as
        self._started = time.monotonic()
        self._ttft_ms: int | None = None
        self._finishing = False  # past this point a cancel must not interrupt the finish write

    # -- listeners ---------------------------------------------------------------------------

    async def follow(self, after: int = -1) -> AsyncIterator[list[bytes]]:
        """The frames after seq `after`, a batch per wake-up, until the generation has finished."""
        pos = after + 1
        while True:
            if pos < self.log.count:
                batch = self.log.between(pos, self.log.count)
                pos += len(batch)
                yield batch
            elif self.finished:
                return
            else:
                await self._changed.wait()

    def _emit(self, frame: bytes) -> None:
        self.log.append(frame)
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed.clear()  # waiters already woken keep their wake-up; new ones wait again

    # -- the run -----------------------------------------------------------------------------

    def cancel(self, status: str = "cancelled") -> None:
        """Stop the upstream; the partial reply is saved with `status`."""
        if self.task is not None and not self._finishing:
            self._cancel_status = status
            self.task.cancel()

    async def run(self) -> None:
        usage: UsageReport | None = None
        finish_reason = "stop"
        error: ProviderError | None = None
        try:
            async for batch in self.chain.stream(self.request):
                for event in batch:
                    kind = type(event)
                    if kind is TextDelta:
                        if not self.log.count:
                            self._ttft_ms = round((time.monotonic() - self._started) * 1000)
                            self.log.append(self._encoder.event(0, "metadata", self.metadata()))
                        self.parts.append(event.text)
                        self.log.append(self._encoder.delta(self.log.count, event.text))
                    elif kind is UsageReport:
                        usage = event
                    elif kind is Finish:
                        finish_reason = event.reason
                self._wake()  # listeners wake once per upstream read, not once per event
            self.status = "complete"
        except ProviderError as e:
            self.status, error = "failed", e
        except asyncio.CancelledError:
            self.status, finish_reason = self._cancel_status, self._cancel_status
        except Exception as e:  # a bug must still end the stream and save what arrived
            log.exception("generation %s crashed", self.turn.message_id)
            self.status, error = "failed", ProviderError(f"internal error: {type(e).__name__}")
        self._finishing = True
        try:
            await self._finish(usage, finish_reason, error)
        finally:
            # whatever happened, listeners must not wait forever
            self.finished = True
            self._changed.set()
            if self.turn.admission is not None:
                self.turn.admission.done()

    def metadata(self) -> dict[str, Any]:
        model = self.chain.used
        if self.turn.anonymous:
            return metadata_json(self.turn.thread_id, self.turn.user_message_id, self.turn.message_id, None, None,
                                 self.turn.category, self.turn.auto, None)
        return metadata_json(self.turn.thread_id, self.turn.user_message_id, self.turn.message_id, model.name,
                             model.provider, self.turn.category, self.turn.auto, self.chain.fallback_from)

    async def _finish(self, usage: UsageReport | None, finish_reason: str, error: ProviderError | None) -> None:
        content = "".join(self.parts)
        model = self.chain.used
        if not self.log.count:
            self._emit(self._encoder.event(0, "metadata", self.metadata()))
        estimated = usage is None
        if usage is None:
            # no report from upstream: estimate what was consumed (nothing, when no attempt got content)
            prompt = sum(estimate_tokens(str(m.get("content", ""))) for m in self.request.messages) if content else 0
            usage = UsageReport(prompt, estimate_tokens(content))
        attempts = [a.as_json() for a in self.chain.attempts]
        error_json = ({"type": error.kind, "message": error.message, "retryable": error.retryable}
                      if error is not None else None)
        admission = self.turn.admission
        record = FinishRecord(
            UsageRecord(self.turn.message_id, self.turn.user_id, self.turn.api_key_id, model.name, model.provider,
                        usage.prompt_tokens, usage.completion_tokens, estimated, cost_usd(model, usage),
                        admission.day if admission else utc_today(),
                        admission.user_reserved if admission else 0, admission.key_reserved if admission else 0),
            status=self.status, content=content, ttft_ms=self._ttft_ms,
            latency_ms=round((time.monotonic() - self._started) * 1000), error=error_json,
            metadata={**self.turn.extra_metadata, **({"anonymous": True} if self.turn.anonymous else {}),
                      "category": self.turn.category, "auto": self.turn.auto,
                      "fallback_from": self.chain.fallback_from, "attempts": attempts,
                      "finish_reason": finish_reason if error is None else "error", "estimated": estimated,
                      # chunk boundaries let a resume after the finish replay exactly the missing deltas
                      "chunks": [len(p) for p in self.parts]})
        self.chain.registry.metrics.usage(record.usage)
        await self._save(record)
        seq = self.log.count
        if error is not None:
            self._emit(self._encoder.event(seq, "error", error_json))
        else:
            total = usage.prompt_tokens + usage.completion_tokens
            usage_json: dict[str, Any] = {"prompt_tokens": usage.prompt_tokens,
                                          "completion_tokens": usage.completion_tokens, "total_tokens": total}
            if estimated:
                usage_json["estimated"] = True
            self._emit(self._encoder.event(seq, "usage", usage_json))
            self._emit(self._encoder.event(seq + 1, "done", done_json(finish_reason, self.turn.message_id, attempts,
                                                                      self.turn.anonymous)))
        self.finished = True
        self._changed.set()

def done_json(finish_reason: str, message_id: uuid.UUID, attempts: list[dict[str, Any]],
              anonymous: bool) -> dict[str, Any]:
    # the attempt trail names models: an anonymous arena slot keeps them for the vote to reveal
    if anonymous:
        return {"finish_reason": finish_reason, "message_id": message_id}
    return {"finish_reason": finish_reason, "message_id": message_id, "attempts": attempts}


def metadata_json(thread_id: uuid.UUID, user_message_id: uuid.UUID, message_id: uuid.UUID, model: str | None,
                  provider: str | None, category: str | None, auto: bool,
                  fallback_from: str | None) -> dict[str, Any]:
    """The `metadata` event's data, live or replayed: one builder so both are byte-identical."""
    return {"thread_id": thread_id, "user_message_id": user_message_id, "message_id": message_id, "model": model,
            "provider": provider, "category": category, "auto": auto, "fallback_from": fallback_from}


def utc_today() -> date:
    return utc_now().date()


def cost_usd(model: ModelConfig, usage: UsageReport) -> float:
    return (usage.prompt_tokens * model.input_price_per_mtok
            + usage.completion_tokens * model.output_price_per_mtok) / 1_000_000


class GenerationRegistry:
    """The live generations of this process, by assistant message id, and their finish write."""

    def __init__(self, pool: asyncpg.Pool, finishes: FinishWriter, shutdown_grace_s: float = 10.0) -> None:
        self.live: dict[uuid.UUID, Generation] = {}
        self._pool = pool
        self._finishes = finishes
        self._grace = shutdown_grace_s

    async def save(self, record: FinishRecord) -> None:
        """The one finish write: returns once the reply is saved, journaled or quarantined."""
        await self._finishes.save(record)

    def cancel(self, message_id: uuid.UUID) -> bool:
        generation = self.live.get(message_id)
        if generation is None:
            return False
        generation.cancel("cancelled")
        return True

    def get(self, message_id: uuid.UUID) -> Generation | None:
        return self.live.get(message_id)

    def start(self, generation: Generation) -> Generation:
        message_id = generation.turn.message_id
        existing = self.live.get(message_id)
        if existing is not None:
            return existing
        self.live[message_id] = generation
        generation.task = asyncio.get_running_loop().create_task(generation.run())
        generation.task.add_done_callback(lambda _: self.live.pop(message_id, None))
        return generation

    async def close(self) -> None:
        """Let running generations finish within the grace period, then interrupt the rest
        (saved as interrupted with their partial content). Safe to call twice."""
        tasks = [g.task for g in self.live.values() if g.task is not None]
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=self._grace)
        for generation in list(self.live.values()):
            generation.cancel("interrupted")
        if pending:
            await asyncio.wait(pending)


def replay_frames(message: dict[str, Any]) -> list[bytes]:
    """A finished message's events rebuilt from its row, with the ids the live stream gave them."""
    encoder = FrameEncoder(str(message["id"]), message["slot"])
    meta = message["metadata"]
    anonymous = bool(meta.get("anonymous"))
    frames = [encoder.event(0, "metadata", metadata_json(
        message["thread_id"], message["reply_to"], message["id"], None if anonymous else message["model"],
        None if anonymous else message["provider"], meta.get("category"), meta.get("auto", False),
        None if anonymous else meta.get("fallback_from")))]
    content, pos = message["content"], 0
    for length in meta.get("chunks", [len(content)] if content else []):
        frames.append(encoder.delta(len(frames), content[pos:pos + length]))
        pos += length
    if message["error"] is not None:
        frames.append(encoder.event(len(frames), "error", _in_order(message["error"], _ERROR_KEYS)))
        return frames
    prompt, completion = message["prompt_tokens"] or 0, message["completion_tokens"] or 0
    usage: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion,
                             "total_tokens": prompt + completion}
    if meta.get("estimated"):
        usage["estimated"] = True
    frames.append(encoder.event(len(frames), "usage", usage))
    frames.append(encoder.event(len(frames), "done", done_json(
        meta.get("finish_reason", "stop"), message["id"],
        [_in_order(a, _ATTEMPT_KEYS) for a in meta.get("attempts", [])], anonymous)))
    return frames


# jsonb keeps object keys sorted (shortest first), not as written: replayed objects get the live
# stream's key order back, so a replay is byte-identical to what the live listeners received
_ATTEMPT_KEYS = tuple(f.name for f in fields(Attempt))
_ERROR_KEYS = ("type", "message", "retryable")


def _in_order(obj: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    return {**{k: obj[k] for k in keys if k in obj}, **obj}
