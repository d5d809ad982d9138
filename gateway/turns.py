"""The service layer: a chat turn from validated input to a running generation, for every front door.

POST /api/chat, the WebSocket, the arena and the OpenAI route all begin their turns here;
handlers only parse, call and respond. The steps, in order:

    persist   the user message is committed (group-committed with concurrent turns); a retry of
              the same client_message_id returns the stored rows and starts nothing
    decide    the router advises a model; the policy approves, downgrades or refuses
    execute   the generation registry starts the reply as an app-owned task
    respond   `Reply` gives the reply's events to any transport, live or replayed from its row

The policy's admission runs just before the commit (a refusal persists nothing, so the same
client_message_id can be retried once the limit clears); the commit still precedes any
provider call. Begin turns shielded: once the user message is committed its generation
must start even if the client disconnects in between.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from . import tracing
from .auth import Principal
from .background import GroupCommit
from .config import Settings
from .errors import NotFound, ServiceUnavailable
from .events import Event
from .fleet.follow import RemoteStreams
from .generation import Generation, GenerationRegistry, GenerationSpec, cost_usd
from .policy import Admission, Policy
from .providers.base import ChainObserver, ChatRequest, UsageReport, estimate_tokens, text_of, tokens_for_chars
from .providers.chain import Chain
from .providers.registry import ModelRegistry, NotEnoughModels
from .replay import replay_events
from .router import Route, route
from .store import arena as arena_store
from .store import messages as message_store
from .store.usage import UsageRecord
from .stream_tokens import StreamTokens
from .vocabulary import LIVE_STATUSES, PolicyAction, Slot

log = logging.getLogger(__name__)


@dataclass(slots=True, kw_only=True)
class TurnInput:
    """A validated chat turn, whichever front door it came through."""

    content: str  # the text (of the text parts, when `parts` is given)
    thread_id: uuid.UUID | None = None
    model: str | None = None
    client_message_id: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    # for this turn only, never stored (the Responses API's `instructions` and input items): the
    # system prompt goes first, `context` between the thread's history and `content`
    system: str | None = None
    context: list[dict[str, Any]] = field(default_factory=list)
    # passed through untouched to OpenAI-compatible upstreams (tools, tool_choice, ...)
    extra: dict[str, Any] = field(default_factory=dict)
    # OpenAI-style content parts (text, image_url) as sent: stored, and sent upstream instead of `content`
    parts: list[dict[str, Any]] | None = None


@dataclass(slots=True)
class Reply:
    """An assistant reply to read: the live generation (on this instance), the finished row, or a
    live row generating on another instance (`remote` follows it: gateway/fleet/follow.py)."""

    generation: Generation | None
    row: dict[str, Any] | None
    remote: Callable[[int], AsyncIterator[list[Event]]] | None = None  # follows it from after a seq

    @property
    def live(self) -> bool:
        return self.generation is not None or self.remote is not None

    def replayed_after(self, after: int) -> list[Event]:
        assert self.row is not None
        return replay_events(self.row, after)

    async def events(self, after: int) -> AsyncIterator[list[Event]]:
        """The events after seq `after`, a batch at a time, until the reply's last."""
        if self.generation is not None:
            async for batch in self.generation.follow(after):
                yield batch
        elif self.remote is not None:
            async for batch in self.remote(after):
                yield batch
        else:
            events = self.replayed_after(after)
            if events:
                yield events


@dataclass(slots=True, kw_only=True)
class Completion:
    """An OpenAI-route request, admitted: stateless (no rows), its usage recorded once at the end."""

    id: uuid.UUID
    principal: Principal
    chain: Chain
    request: ChatRequest
    admission: Admission


class Turns:
    """Begins turns and finds replies. One per app (`state.TURNS`)."""

    def __init__(self, *, pool: asyncpg.Pool, settings: Settings, models: ModelRegistry, policy: Policy,
                 generations: GenerationRegistry, stream_tokens: StreamTokens, instance_id: uuid.UUID,
                 record_usage: Callable[[UsageRecord], None], observer: ChainObserver,
                 notify_cancel: Callable[[uuid.UUID], Awaitable[None]], remote: RemoteStreams) -> None:
        self._pool = pool
        self._settings = settings
        self._models = models
        self._policy = policy
        self._generations = generations
        self._stream_tokens = stream_tokens
        self._instance_id = instance_id
        self._record_usage = record_usage  # the batched usage writer (OpenAI route)
        self._observer = observer  # metrics
        self._notify_cancel = notify_cancel  # asks the other instances (LISTEN/NOTIFY)
        self._remote = remote  # follows replies generating on other instances
        # the persist step's writes, group-committed when concurrent turns pile up
        self._persist: GroupCommit[message_store.TurnRequest, message_store.StoredTurn] = GroupCommit(
            lambda batch: message_store.persist_turns(pool, batch))

    # -- begin --------------------------------------------------------------------------------

    async def begin_chat(self, principal: Principal, turn: TurnInput,
                         started: float | None = None) -> message_store.StoredTurn:
        """Decide, persist, start one reply. `started`: the request's arrival (time.monotonic())."""
        if turn.client_message_id is not None:
            # a retry of an accepted turn is answered before any limit: it costs nothing new
            existing = await message_store.find_duplicate(self._pool, principal.user_id, turn.client_message_id)
            if existing is not None:
                return existing
        messages = await self.conversation(principal, turn)
        choice = self.route(turn.model, turn.content)
        with tracing.span("gateway.policy") as decision:
            admission = await self._policy.admit(principal, choice.model, prompt_tokens(messages), turn.max_tokens,
                                                 self._settings.limits.downgrade_model)
            decision.set_attribute("gateway.policy.action", str(admission.action))
        try:
            with tracing.span("gateway.persist"):
                stored = await self._persist.submit(message_store.TurnRequest(
                    user_id=principal.user_id, content=turn.content, client_message_id=turn.client_message_id,
                    thread_id=turn.thread_id, instance_id=self._instance_id,
                    reservation=self.reservation(principal, admission, messages), parts=turn.parts))
        except BaseException:
            await self._policy.release(admission, principal.user_id, principal.api_key_id)
            raise
        assert stored is not None
        if stored.duplicate:  # lost a race with an identical request: that one runs
            await self._policy.release(admission, principal.user_id, principal.api_key_id)
            return stored
        extra: dict[str, Any] = {"complexity": choice.complexity} if choice.complexity else {}
        extra.update({"selected": choice.selected} if choice.selected else {})  # model "random" (providers)
        if admission.action == PolicyAction.DOWNGRADE:
            extra["policy"] = {"action": PolicyAction.DOWNGRADE, "reasons": admission.reasons,
                               "downgraded_from": admission.downgraded_from}
        self._generations.start(
            GenerationSpec(user_id=principal.user_id, api_key_id=principal.api_key_id, thread_id=stored.thread_id,
                           user_message_id=stored.user_message["id"], message_id=stored.assistant_message_id,
                           category=choice.category, auto=choice.auto, extra_metadata=extra, admission=admission),
            admission.model,
            ChatRequest(messages, max_tokens=admission.max_tokens, temperature=turn.temperature, top_p=turn.top_p,
                        extra=dict(turn.extra)), started)
        return stored

    async def begin_arena(self, principal: Principal, turn: TurnInput, requested: list[str] | None,
                          anonymous: bool, started: float | None = None) -> arena_store.ArenaTurn:
        """Decide (both models, both admissions), persist the turn, start both slots. No downgrade to a
        cheaper model here: the comparison is of the two models asked for (max_tokens may be clamped)."""
        if turn.client_message_id is not None:
            existing = await arena_store.find_duplicate(self._pool, principal.user_id, turn.client_message_id)
            if existing is not None:
                return existing
        messages = await self.conversation(principal, turn)
        if requested is None:
            try:
                pair = [m.name for m in self._models.draw_pair()]
            except NotEnoughModels as e:
                raise ServiceUnavailable(f"the arena needs two available models: {e}") from None
        else:
            pair = requested
        # both slots count toward the caller's limits; if either is refused, nothing is kept
        admissions: list[Admission] = []
        try:
            for shares_left, model in zip((2, 1), pair, strict=True):
                # slot a may take at most half of what remains today, slot b what is left after it
                with tracing.span("gateway.policy"):
                    admissions.append(await self._policy.admit(principal, model, prompt_tokens(messages),
                                                               turn.max_tokens, share=shares_left))
            with tracing.span("gateway.persist"):
                stored = await arena_store.persist_arena_turn(
                    self._pool, principal.user_id, turn.content, turn.client_message_id, turn.thread_id,
                    self._instance_id, pair[0], pair[1], anonymous,
                    (self.reservation(principal, admissions[0], messages),
                     self.reservation(principal, admissions[1], messages)))
        except BaseException:
            for admission in admissions:
                await self._policy.release(admission, principal.user_id, principal.api_key_id)
            raise
        if stored.duplicate:
            for admission in admissions:
                await self._policy.release(admission, principal.user_id, principal.api_key_id)
            return stored
        for slot, message_id, admission in zip(Slot, (stored.message_a, stored.message_b), admissions, strict=True):
            # each slot is its own generation, with its own chain and timeouts: one failing or
            # hanging never holds up the other
            self._generations.start(
                GenerationSpec(user_id=principal.user_id, api_key_id=principal.api_key_id,
                               thread_id=stored.thread_id, user_message_id=stored.user_message["id"],
                               message_id=message_id, extra_metadata={"comparison_id": str(stored.comparison_id)},
                               admission=admission, slot=slot, anonymous=anonymous),
                admission.model,
                ChatRequest(list(messages), max_tokens=admission.max_tokens, temperature=turn.temperature), started)
        return stored

    async def begin_completion(self, principal: Principal, model: str, request: ChatRequest,
                               started: float | None = None) -> Completion:
        """Decide for an OpenAI-route request (no rows: that route is stateless); `finish_completion`
        must follow, however the request ends."""
        choice = self.route(model, last_user_text(request.messages))
        with tracing.span("gateway.policy") as decision:
            admission = await self._policy.admit(principal, choice.model, prompt_tokens(request.messages),
                                                 request.max_tokens, self._settings.limits.downgrade_model)
            decision.set_attribute("gateway.policy.action", str(admission.action))
        request.max_tokens = admission.max_tokens
        chain = Chain(self._models, self._models.chain(admission.model), observer=self._observer, started=started)
        tracing.start_chat(chain, request)  # when traced, until finish_completion (in this same task)
        return Completion(id=uuid.uuid4(), principal=principal, request=request, admission=admission, chain=chain)

    def finish_completion(self, completion: Completion, usage: UsageReport | None, chars: int,
                          started: bool) -> None:
        """Queue the completion's usage, whatever happened: exactly one record per completion, which
        also settles its reservation. `chars`: the reply's length so far; `started`: whether any of
        it reached the client."""
        admission, principal = completion.admission, completion.principal
        admission.done()
        estimated = usage is None
        if usage is None:
            if not started and not chars:
                if not admission.holds_anything:
                    tracing.end_chat()
                    return  # nothing reached the client, nothing was reserved: nothing to count
                usage = UsageReport(0, 0)  # a zero record hands the reservation back
            else:
                usage = estimated_usage(completion.request, chars)
        model = completion.chain.used
        record = UsageRecord(
            message_id=completion.id, user_id=principal.user_id, api_key_id=principal.api_key_id, model=model.name,
            provider=model.provider, prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
            estimated=estimated, cost_usd=cost_usd(model, usage), **admission.held())
        self._record_usage(record)
        self._observer.usage(record)
        tracing.end_chat()

    def reservation(self, principal: Principal, admission: Admission,
                    messages: list[dict[str, Any]]) -> dict[str, Any]:
        """What a reply's admission holds, kept on its row until the finish: if its instance dies, the
        sweep settles the reservation to an estimate of what was consumed (store.instances)."""
        model = self._models.models.get(admission.model)
        return {**admission.reservation_json(),
                "api_key_id": str(principal.api_key_id) if principal.api_key_id else None,
                "prompt_tokens": prompt_tokens(messages), "model": admission.model,
                "provider": model.provider if model else None,
                "input_price_per_mtok": model.input_price_per_mtok if model else 0.0,
                "output_price_per_mtok": model.output_price_per_mtok if model else 0.0}

    def route(self, requested: str | None, prompt: str) -> Route:
        """Decide, part one: the router's advice (never touches the database)."""
        return route(requested, prompt, dict(self._settings.router), self._models.default, self._models.draw_name)

    async def conversation(self, principal: Principal, turn: TurnInput) -> list[dict[str, Any]]:
        """What the upstream gets: the thread's history (NotFound if not the caller's), then the new
        message. Read before the commit: it bounds the prompt the policy reserves for."""
        messages = [] if turn.thread_id is None else await message_store.thread_history(
            self._pool, principal.user_id, turn.thread_id)
        if turn.system is not None:
            messages.insert(0, {"role": "system", "content": turn.system})
        messages.extend(turn.context)
        messages.append({"role": "user", "content": turn.content if turn.parts is None else turn.parts})
        return messages

    # -- find, follow, cancel -------------------------------------------------------------------

    async def reply(self, user_id: uuid.UUID, message_id: uuid.UUID) -> Reply:
        """An assistant reply of this user: live here, live on another instance, or finished."""
        generation = self._generations.get(message_id)
        if generation is not None:
            if generation.spec.user_id != user_id:
                raise NotFound("message not found")
            return Reply(generation, None)
        message = await message_store.get_message(self._pool, user_id, message_id)
        if message["role"] != "assistant":
            raise NotFound("message not found")
        if message["status"] in LIVE_STATUSES:
            return Reply(None, message, lambda after: self._remote.follow(user_id, message, after))
        return Reply(None, message)

    async def cancel(self, user_id: uuid.UUID, message_id: uuid.UUID) -> dict[str, Any]:
        """Cancel an assistant reply wherever it is generating; returns its saved row."""
        message = await message_store.get_message(self._pool, user_id, message_id)
        if message["role"] != "assistant":
            raise NotFound("message not found")
        generation = self._generations.get(message_id)
        if generation is not None:
            generation.cancel()
            if generation.task is not None:
                await asyncio.shield(generation.task)  # returns once the partial reply is saved
        elif message["status"] in LIVE_STATUSES:
            await self._notify_cancel(message_id)
            async for _ in (await self.reply(user_id, message_id)).events(-1):
                pass  # until it has finished over there (or was swept, if that instance is gone)
        return await message_store.get_message(self._pool, user_id, message_id)

    async def delete_turn(self, user_id: uuid.UUID, message_id: uuid.UUID) -> None:
        """Remove an assistant reply's turn (its user message and the reply; the thread too when nothing
        else is left in it). A live reply is cancelled first, so its usage is settled; usage rows stay."""
        message = await message_store.get_message(self._pool, user_id, message_id)
        if message["role"] != "assistant" or message["slot"] is not None:
            raise NotFound("message not found")
        if message["status"] in LIVE_STATUSES:
            await self.cancel(user_id, message_id)
        if not await message_store.delete_turn(self._pool, user_id, message_id):
            raise NotFound("message not found")

    def stream_url(self, principal: Principal, message_id: uuid.UUID) -> str:
        """Where an EventSource (which cannot send headers) follows the reply: a token in the URL,
        bound to this user, message and credential, short-lived, and redacted from the access log."""
        return f"/api/messages/{message_id}/stream?token={self._stream_token(principal, message_id)}"

    def comparison_stream_url(self, principal: Principal, comparison_id: uuid.UUID) -> str:
        return f"/api/comparisons/{comparison_id}/stream?token={self._stream_token(principal, comparison_id)}"

    def _stream_token(self, principal: Principal, resource_id: uuid.UUID) -> str:
        return self._stream_tokens.issue(principal.user_id, resource_id, api_key_id=principal.api_key_id,
                                         not_after=principal.expires_at)


def prompt_tokens(messages: list[dict[str, Any]]) -> int:
    return sum(estimate_tokens(text_of(m.get("content"))) for m in messages)


def estimated_usage(request: ChatRequest, chars: int) -> UsageReport:
    """For upstreams that report no usage (or a reply cut short): counted from the text."""
    return UsageReport(prompt_tokens(request.messages), tokens_for_chars(chars))


def last_user_text(messages: list[dict[str, Any]]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            return text_of(message.get("content"))
    return ""
