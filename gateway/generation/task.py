"""Execute: one assistant reply as a task the app owns, and the registry of this process's replies.

A generation runs to its end whatever its listeners do: a client that disconnects stops
nothing, and the reply is saved exactly once (the finish write, see `FinishRecord`). Its events
are structured (`events.Event`) and kept in an `EventLog`, so any number of listeners can replay
from any point and follow live; a slow listener only reads later, it never holds the
generation up. Each transport (SSE, arena SSE, WebSocket) formats the events itself.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import date
from typing import Any

import asyncpg

from gateway.config import ModelConfig
from gateway.generation.checkpoints import Checkpointer, progress
from gateway.generation.durability import FinishWriter
from gateway.generation.events import (
    Event,
    EventLog,
    EventMaker,
    done_json,
    metadata_json,
    reasoning_json,
    usage_json,
)
from gateway.observability import tracing
from gateway.policy.admission import Admission, utc_now
from gateway.providers.base import (
    ChainObserver,
    ChatRequest,
    Finish,
    ProviderError,
    ReasoningDelta,
    TextDelta,
    ToolCallDelta,
    UsageReport,
)
from gateway.providers.chain import Chain
from gateway.providers.normalise import charged
from gateway.providers.registry import ModelRegistry
from gateway.providers.turn import merge_calls
from gateway.store.messages import FinishRecord, checkpoint_many
from gateway.store.usage import UsageRecord
from gateway.vocabulary import MessageStatus

log = logging.getLogger(__name__)

SaveFinish = Callable[[FinishRecord], Awaitable[FinishRecord]]


@dataclass(slots=True, kw_only=True)
class GenerationSpec:
    """Who and what a generation is for: the persist step's rows and the decide step's choice."""

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


class Generation:
    def __init__(self, spec: GenerationSpec, chain: Chain, request: ChatRequest, save: SaveFinish,
                 checkpoints: Checkpointer | None = None) -> None:
        self.spec = spec
        self.chain = chain
        self.request = request
        self._save = save
        self._checkpoints = checkpoints
        self.parts: list[str] = []  # the reply's text chunks, in order (the deltas' seqs skip the reasoning's)
        self._maker = EventMaker(spec.message_id, spec.slot)
        self.events = EventLog(self._maker, self.parts)
        # the reasoning events, [seq, text] or [seq, text, signature]: saved in the reply's metadata
        # (not its content) so a replay gives them back where they were
        self.reasoning: list[list[Any]] = []
        # the upstream's tool-call fragments: whole calls are saved in the reply's metadata (`tool_calls`)
        self.calls: list[dict[str, Any]] = []
        self.finished = False
        self.status = MessageStatus.STREAMING
        self.task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()
        self._cancel_status = MessageStatus.INTERRUPTED  # what a cancellation is saved as
        self._started = time.monotonic()
        self._ttft_ms: int | None = None
        self._finishing = False  # past this point a cancel must not interrupt the finish write
        self.publish: Callable[[Generation], None] | None = None  # the fleet's hook (gateway/fleet/publisher.py)

    # -- listeners ---------------------------------------------------------------------------

    async def follow(self, after: int = -1) -> AsyncIterator[list[Event]]:
        """The events after seq `after`, a batch per wake-up, until the generation has finished."""
        pos = after + 1
        while True:
            count = self.events.count
            if pos < count:
                batch = self.events.between(pos, count)
                pos = count
                yield batch
            elif self.finished:
                return
            else:
                await self._changed.wait()

    def _emit(self, event: Event) -> None:
        self.events.append(event)
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed.clear()  # waiters already woken keep their wake-up; new ones wait again
        if self.publish is not None:
            self.publish(self)

    # -- the run -----------------------------------------------------------------------------

    def cancel(self, status: MessageStatus = MessageStatus.CANCELLED) -> None:
        """Stop the upstream; the partial reply is saved with `status`."""
        if self.task is not None and not self._finishing:
            self._cancel_status = status
            self.task.cancel()

    async def run(self) -> None:
        usage: UsageReport | None = None
        finish_reason = "stop"
        error: ProviderError | None = None
        events, maker, parts = self.events, self._maker, self.parts
        checkpoints, message_id = self._checkpoints, self.spec.message_id
        tracing.start_chat(self.chain, self.request)  # the reply's span, when the turn is traced
        try:
            async for batch in self.chain.stream(self.request):
                for event in batch:
                    # exact-type tests: as fast as a dict dispatch here, and mypy narrows on them
                    if type(event) is TextDelta:
                        if not events.count:
                            self._ttft_ms = round((time.monotonic() - self._started) * 1000)
                            events.append(maker.event(0, "metadata", self.metadata()))
                        parts.append(event.text)
                        events.append(maker.delta(events.count, event.text))
                    elif type(event) is UsageReport:
                        usage = event
                    elif type(event) is Finish:
                        finish_reason = event.reason
                    elif type(event) is ReasoningDelta:
                        self._reasoning(event)
                    elif type(event) is ToolCallDelta:
                        self.calls.extend(event.calls)
                self._wake()  # listeners wake once per upstream read, not once per event
                if (checkpoints is not None
                        and progress(self) - checkpoints.saved(message_id) >= checkpoints.max_chunks):
                    checkpoints.nudge()
            self.status = MessageStatus.COMPLETE
        except ProviderError as e:
            self.status, error = MessageStatus.FAILED, e
        except asyncio.CancelledError:
            self.status, finish_reason = self._cancel_status, str(self._cancel_status)
        except Exception as e:  # a bug must still end the stream and save what arrived
            log.exception("generation %s crashed", self.spec.message_id)
            self.status, error = MessageStatus.FAILED, ProviderError(f"internal error: {type(e).__name__}")
        self._finishing = True
        try:
            await self._finish(usage, finish_reason, error)
        except Exception:
            # the finish itself failed (a bug): the row still ends failed, the reservation is still
            # settled, and the listeners still get a terminal event
            log.exception("finishing generation %s failed", self.spec.message_id)
            error_json = {"type": "internal_error", "message": "the reply could not be finished", "retryable": True}
            try:
                await self._save(self._failed_record(error_json))
            except Exception:
                log.exception("saving generation %s as failed failed too", self.spec.message_id)
            if not events.count:
                self._emit(maker.event(0, "metadata", self.metadata()))
            if not events.between(events.count - 1, events.count)[0].terminal:
                self._emit(maker.event(events.count, "error", error_json))
        finally:
            # whatever happened, listeners must not wait forever
            self.finished = True
            self._changed.set()
            if self.publish is not None:
                self.publish(self)
            if self.spec.admission is not None:
                self.spec.admission.done()
            tracing.end_chat(self.status, finish_reason, self._ttft_ms, self.parts, error.kind if error else None)

    def _reasoning(self, event: ReasoningDelta) -> None:
        """A reasoning event among the deltas (a redacted block has nothing to show: not sent)."""
        if event.redacted is not None or not (event.text or event.signature):
            return
        events = self.events
        if not events.count:
            self._ttft_ms = round((time.monotonic() - self._started) * 1000)
            events.append(self._maker.event(0, "metadata", self.metadata()))
        seq = events.count
        events.append_side(self._maker.event(seq, "reasoning", reasoning_json(event.text, event.signature)))
        self.reasoning.append([seq, event.text, event.signature] if event.signature else [seq, event.text])

    def tool_calls(self) -> list[dict[str, Any]]:
        """The reply's whole tool calls (canonical shape), when it completed: a cut reply's arguments
        may be half a JSON text, and nobody can answer a call that was never finished. A call the
        upstream gave no id gets `call_<message hex>_<index>` (what the Responses door names it)."""
        if self.status is not MessageStatus.COMPLETE or not self.calls:
            return []
        calls = merge_calls(self.calls)
        for i, call in enumerate(calls):
            call["id"] = call["id"] or f"call_{self.spec.message_id.hex}_{i}"
        return calls

    def _failed_record(self, error_json: dict[str, Any]) -> FinishRecord:
        """The least that can be saved of a reply whose finish broke: no content, an estimated zero
        usage (which hands its reservation back), the error."""
        spec, admission, model = self.spec, self.spec.admission, self.chain.used
        return FinishRecord(
            usage=UsageRecord(
                message_id=spec.message_id, user_id=spec.user_id, api_key_id=spec.api_key_id, model=model.name,
                provider=model.provider, prompt_tokens=0, completion_tokens=0, estimated=True, cost_usd=0.0,
                **(admission.held() if admission else {"day": utc_today()})),
            status=MessageStatus.FAILED, content="", ttft_ms=self._ttft_ms,
            latency_ms=round((time.monotonic() - self._started) * 1000), error=error_json,
            metadata={**spec.extra_metadata, "finish_reason": "error", "estimated": True})

    def metadata(self) -> dict[str, Any]:
        spec = self.spec
        if spec.anonymous:
            model = provider = fallback_from = None
        else:
            used = self.chain.used
            model, provider, fallback_from = used.name, used.provider, self.chain.fallback_from
        return metadata_json(thread_id=spec.thread_id, user_message_id=spec.user_message_id,
                             message_id=spec.message_id, model=model, provider=provider, category=spec.category,
                             auto=spec.auto, fallback_from=fallback_from, selected=spec.extra_metadata.get("selected"))

    async def _finish(self, usage: UsageReport | None, finish_reason: str, error: ProviderError | None) -> None:
        spec, maker = self.spec, self._maker
        content = "".join(self.parts)
        model = self.chain.used
        if not self.events.count:
            self._emit(maker.event(0, "metadata", self.metadata()))
        calls = self.tool_calls()
        # the upstream's counts when believable, else the estimate of what was consumed (nothing,
        # when no attempt got content or reported usage)
        chars = len(content) + sum(len(c["function"]["arguments"]) for c in calls)
        usage = charged(self.request, usage, chars, consumed=bool(content or calls))
        estimated = usage.estimated
        attempts = [a.as_json() for a in self.chain.attempts]
        error_json: dict[str, Any] | None = None
        if error is not None:
            error_json = {"type": error.kind, "message": error.message, "retryable": error.retryable}
        hidden: dict[str, Any] = {}
        if error_json is not None and spec.anonymous:
            # an anonymous slot must not name its model before the vote, not even in an error text:
            # the stream and the row get the masked text, the metadata (masked on read) the real one
            masked = mask_model_names(error_json["message"], self.chain.models)
            if masked != error_json["message"]:
                hidden["error_detail"] = error_json["message"]
                error_json = {**error_json, "message": masked}
        admission = spec.admission
        record = FinishRecord(
            usage=UsageRecord(
                message_id=spec.message_id, user_id=spec.user_id, api_key_id=spec.api_key_id, model=model.name,
                provider=model.provider, prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens, estimated=estimated, cost_usd=cost_usd(model, usage),
                cached_tokens=usage.cached_tokens, cache_write_tokens=usage.cache_write_tokens,
                reasoning_tokens=usage.reasoning_tokens,
                **(admission.held() if admission else {"day": utc_today()})),
            status=self.status, content=content, ttft_ms=self._ttft_ms,
            latency_ms=round((time.monotonic() - self._started) * 1000), error=error_json,
            metadata={**spec.extra_metadata, **({"anonymous": True} if spec.anonymous else {}), **hidden,
                      "category": spec.category, "auto": spec.auto,
                      "fallback_from": self.chain.fallback_from, "attempts": attempts,
                      "finish_reason": finish_reason if error is None else "error", "estimated": estimated,
                      # the upstream's counts were out of range or not believed (see providers/normalise.py)
                      **({"usage_suspect": True} if usage.suspect else {}),
                      # the prompt's cached parts, for a replay's usage event and a stored response
                      **({"cached_tokens": usage.cached_tokens} if usage.cached_tokens else {}),
                      **({"cache_write_tokens": usage.cache_write_tokens} if usage.cache_write_tokens else {}),
                      **({"reasoning": self.reasoning} if self.reasoning else {}),
                      **({"tool_calls": calls} if calls else {}),
                      # chunk boundaries let a resume after the finish replay exactly the missing deltas
                      "chunks": [len(p) for p in self.parts]})
        self.chain.observer.usage(record.usage)
        saved = await self._save(record)  # returns once the reply is durable: only then is it reported done
        seq = self.events.count
        if saved is not record and saved.error is not None:
            # the database refused the reply as it came (it is quarantined): say what was kept
            error_json = saved.error
        if error_json is not None:
            self._emit(maker.event(seq, "error", error_json))
        else:
            usage_data = usage_json(usage.prompt_tokens, usage.completion_tokens, estimated, usage.cached_tokens,
                                    usage.cache_write_tokens)
            if usage.suspect:
                usage_data["usage_suspect"] = True
            self._emit(maker.event(seq, "usage", usage_data))
            self._emit(maker.event(seq + 1, "done", done_json(finish_reason, spec.message_id, attempts,
                                                              spec.anonymous, calls)))


HIDDEN_MODEL = "(hidden)"


def mask_model_names(text: str, models: list[ModelConfig]) -> str:
    """`text` with every name of the planned models (gateway name, upstream id, provider) replaced
    by HIDDEN_MODEL, whole words only, longest first (so a name inside a longer one goes with it)."""
    names = sorted({n for m in models for n in (m.name, m.upstream, m.provider) if n}, key=len, reverse=True)
    pattern = re.compile("|".join(rf"(?<![\w.-]){re.escape(n)}(?![\w-]|\.\w)" for n in names))
    return pattern.sub(HIDDEN_MODEL, text)


def utc_today() -> date:
    return utc_now().date()


def cost_usd(model: ModelConfig, usage: UsageReport) -> float:
    """The reply's price: uncached input, cached input and cache writes each at their price (a cache
    price not configured is the input price), output (reasoning included) at the output price."""
    return (usage.input_tokens * model.input_price_per_mtok + usage.cached_tokens * model.cached_price
            + usage.cache_write_tokens * model.cache_write_price
            + usage.completion_tokens * model.output_price_per_mtok) / 1_000_000


class GenerationRegistry:
    """The live generations of this process, by assistant message id, and their finish write."""

    def __init__(self, pool: asyncpg.Pool, finishes: FinishWriter, models: ModelRegistry, observer: ChainObserver,
                 shutdown_grace_s: float = 10.0, checkpoint_s: float = 2.0, checkpoint_chunks: int = 256) -> None:
        self.live: dict[uuid.UUID, Generation] = {}
        # partial replies saved every checkpoint_s (or checkpoint_chunks): what a crash can lose
        self.checkpoints = Checkpointer(self.live, lambda batch: checkpoint_many(pool, batch),
                                        interval_s=checkpoint_s, max_chunks=checkpoint_chunks)
        self._pool = pool
        self._finishes = finishes
        self._models = models
        self._observer = observer
        self._grace = shutdown_grace_s
        self.publisher: Callable[[Generation], None] | None = None  # with REDIS_URL: every event batch goes out

    async def save(self, record: FinishRecord) -> FinishRecord:
        """The one finish write: returns once the reply is saved, journaled or quarantined (with
        what was kept)."""
        with tracing.span("gateway.finish_write"):
            return await self._finishes.save(record)

    def cancel(self, message_id: uuid.UUID) -> bool:
        generation = self.live.get(message_id)
        if generation is None:
            return False
        generation.cancel(MessageStatus.CANCELLED)
        return True

    def get(self, message_id: uuid.UUID) -> Generation | None:
        return self.live.get(message_id)

    def start(self, spec: GenerationSpec, model: str, request: ChatRequest, started: float | None = None) -> Generation:
        """Run `model`'s chain (it, then its fallbacks) for `spec` as an app-owned task; a second
        start for the same message returns the running one. `started`: when the request arrived
        (time.monotonic()), for the gateway-overhead metric."""
        existing = self.live.get(spec.message_id)
        if existing is not None:
            return existing
        chain = Chain(self._models, self._models.chain(model), observer=self._observer, started=started)
        generation = Generation(spec, chain, request, self.save, self.checkpoints)
        generation.publish = self.publisher
        message_id = spec.message_id
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
            generation.cancel(MessageStatus.INTERRUPTED)
        if pending:
            await asyncio.wait(pending)
