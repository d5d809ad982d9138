"""The service layer: a chat turn from validated input to a running generation, for every front door.

POST /api/chat, the WebSocket, the arena and the OpenAI route all begin their turns here;
handlers only parse, call and respond. The steps, in order:

    persist   the abuse limit (requests per minute) is taken first: a 429 there writes nothing;
              then the user message is committed (group-committed with concurrent turns); a
              retry of the same client_message_id returns the stored rows and starts nothing
    decide    the router advises a model; the policy approves, downgrades or stops: after the
              commit, so a stop keeps the user's message and saves the reply as `refused` (with
              the reason and when it clears), and the client gets an `error` event of type policy
    execute   the generation registry starts the reply as an app-owned task
    respond   `Reply` gives the reply's events to any transport, live or replayed from its row

`regenerate` adds a reply to a saved user message through the same decide and execute steps.
Begin turns shielded: once the user message is committed its reply must be decided and started
(or saved refused) even if the client disconnects in between.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

import asyncpg

from gateway.config import Settings
from gateway.edge.stream_tokens import StreamTokens
from gateway.errors import BadRequest, Conflict, Forbidden, NotFound, ServiceUnavailable, TooManyRequests
from gateway.fleet.follow import RemoteStreams
from gateway.generation.events import Event
from gateway.generation.replay import replay_events
from gateway.generation.task import Generation, GenerationRegistry, GenerationSpec, cost_usd, mask_model_names
from gateway.observability import tracing
from gateway.policy.admission import Admission, Policy, limits_for
from gateway.providers.base import ChainObserver, ChatRequest, UsageReport, prompt_estimate, text_of
from gateway.providers.chain import Chain, history_may_be_refused, refused_by_chain
from gateway.providers.normalise import charged
from gateway.providers.registry import ModelRegistry, NotEnoughModels
from gateway.providers.turn import closed_rounds
from gateway.providers.turn import features as turn_features
from gateway.service.router import RANDOM, Route, route
from gateway.store import arena as arena_store
from gateway.store import messages as message_store
from gateway.store.background import GroupCommit
from gateway.store.usage import UsageRecord
from gateway.vocabulary import LIVE_STATUSES, MessageStatus, PolicyAction, Principal, Slot

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
    # a prompt that is more than one user message (the Responses API's tool round: the tools' results,
    # the calls they answer when sent too, the user's words): its canonical messages, stored with the
    # user message and sent upstream instead of it (`content` is the text of its user messages)
    prompt: list[dict[str, Any]] | None = None


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


# What the persist statement noted on a reply's row (for the sweep of a dead instance), as it is
# decided: "admission", the early admission's reservation, for the whole prompt; "attribution", who
# and what it is for, for the whole prompt; a slice's id, an early admission's reservation from that
# slice, but for the prompt without the thread's history; None, the attribution, but for that prompt
_Noted = Literal["attribution", "admission"] | uuid.UUID | None


@dataclass(slots=True, kw_only=True)
class _Plan:
    """One reply to decide and start, once its placeholder row is committed."""

    thread_id: uuid.UUID
    user_message_id: uuid.UUID
    message_id: uuid.UUID
    choice: Route
    messages: list[dict[str, Any]]  # what the upstream gets
    turn: TurnInput  # the request's sampling parameters
    downgrade_to: str | None = None  # the policy may switch to this model near the daily cap
    share: int = 1  # see Policy.admit
    slot: Slot | None = None
    anonymous: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # for the reply's metadata


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

    # -- begin ----------------------------------------------------------------------------------

    async def begin_chat(self, principal: Principal, turn: TurnInput,
                         started: float | None = None) -> message_store.StoredTurn:
        """Persist, decide, start one reply. `started`: the request's arrival (time.monotonic()).

        The commit is the one round trip before the upstream call: a thread's
        history comes back from the persist statement itself, so anything decided before it counts
        the new message alone, and is taken again for the whole prompt after it (see below). The one
        exception: a chain that could refuse what a history holds (no OpenAI-compatible link) gets the
        history's messages with content parts read first, so that a turn it cannot express is a 400
        with nothing written, whichever of its messages holds the feature."""
        messages = self.framed(turn, [])
        choice = self.route(turn.model, turn.content, principal)
        # the thread's earlier messages go upstream too: the few with content parts are read before
        # the commit, only when the chain could refuse such parts (a chain with an OpenAI-compatible
        # link takes any history: no read, the commit stays the one round trip)
        earlier: list[dict[str, Any]] = []
        if turn.thread_id is not None and history_may_be_refused(
                self._models, choice.model, ChatRequest(messages, extra=turn.extra)):
            earlier = await message_store.history_parts(self._pool, principal.user_id, turn.thread_id)
        if earlier or turn.parts is not None or turn.extra or turn.prompt is not None:  # text only: no chain look
            refused = refused_by_chain(self._models, choice.model,
                                       ChatRequest(self.framed(turn, earlier), extra=turn.extra))
            if refused is not None:  # no link can express it: a 400 before anything is written
                if turn.client_message_id is not None:
                    # unless it retries a turn accepted before its thread changed: that turn's rows
                    existing = await message_store.find_duplicate(self._pool, principal.user_id,
                                                                  turn.client_message_id)
                    if existing is not None:
                        return existing
                raise BadRequest(refused.message)
        # a busy caller's whole admission comes from its quota slice, in memory, and cannot be
        # refused: then the reservation rides in the persist statement (no statement after it),
        # and a retry of an accepted turn is found by that statement (given back: stored.duplicate)
        early = None if self._settings.limits.downgrade_model else self._policy.admit_now(
            principal, choice.model, prompt_tokens(messages, turn.extra), turn.max_tokens)
        if early is None:
            if turn.client_message_id is not None:
                # a retry of an accepted turn is answered before any limit: it costs nothing new, and
                # gets the first request's rows (a refused reply stays refused: never a second decision)
                existing = await message_store.find_duplicate(self._pool, principal.user_id,
                                                              turn.client_message_id)
                if existing is not None:
                    return existing
            with tracing.span("gateway.rate_limit"):  # the abuse limit: a 429 here has written nothing
                await self._policy.admit_rate(principal)
        try:
            with tracing.span("gateway.persist"):
                stored = await self._persist.submit(message_store.TurnRequest(
                    user_id=principal.user_id, content=turn.content, client_message_id=turn.client_message_id,
                    thread_id=turn.thread_id, instance_id=self._instance_id, parts=turn.parts, messages=turn.prompt,
                    reservation=self.attribution(principal, choice.model, messages, turn.extra) if early is None
                    else self.reservation(principal, early, messages, turn.extra)))
            assert stored is not None
        except BaseException:
            if early is not None:
                await asyncio.shield(self._policy.release(early, principal.user_id, principal.api_key_id))
            raise
        if stored.duplicate:  # lost a race with an identical request: that one decides and runs
            if early is not None:
                await self._policy.release(early, principal.user_id, principal.api_key_id)
            return stored
        noted: _Noted = "admission" if early is not None else "attribution"  # what the row holds already
        if stored.history:
            messages = self.framed(turn, stored.history)
            noted = None
            if early is not None:
                # the history adds to the prompt the early admission reserved for: the admission is
                # taken again for the whole prompt after the commit, as on the exact path (`rate=False`:
                # the window slot stays taken) — from the same slice, in memory, when it covers it
                noted = early.quota_id
                await self._policy.release(early, principal.user_id, principal.api_key_id)
                early = None
        await self._decide_and_start(principal, _Plan(
            thread_id=stored.thread_id, user_message_id=stored.user_message["id"],
            message_id=stored.assistant_message_id, choice=choice, messages=messages, turn=turn,
            downgrade_to=self._settings.limits.downgrade_model), started, early, noted)
        return stored

    async def regenerate(self, principal: Principal, user_message_id: uuid.UUID, model: str | None,
                         client_request_id: str | None, started: float | None = None) -> message_store.Regeneration:
        """A new reply to a saved user message whose last reply is not live (the earlier replies
        stay). Decided and run like a new turn, on the thread's history up to that message.
        `model`: None asks for what the last reply was asked for (`auto` if it was routed)."""
        pool, user_id = self._pool, principal.user_id
        if client_request_id is not None:
            found = await message_store.find_regeneration(pool, user_id, user_message_id, client_request_id)
            if found is not None:
                return found
        try:
            user_message, last = await message_store.regeneration_target(pool, user_id, user_message_id)
        except Conflict:
            # the live reply may be this very request's, made by a retry that got there first
            if client_request_id is not None:
                found = await message_store.find_regeneration(pool, user_id, user_message_id, client_request_id)
                if found is not None:
                    return found
            raise
        if model is None:
            model = self._asked_for(last)
        history = await message_store.thread_history(pool, user_id, user_message["thread_id"], before=user_message)
        prompt = message_store.prompt_of(user_message)
        messages = closed_rounds(history, prompt) + prompt
        choice = self.route(model, user_message["content"], principal)
        refused = refused_by_chain(self._models, choice.model, ChatRequest(messages))  # the history read above
        if refused is not None:  # a 400 before anything is written, as for a new turn
            raise BadRequest(refused.message)
        with tracing.span("gateway.rate_limit"):
            await self._policy.admit_rate(principal)
        made = await message_store.insert_regeneration(pool, user_id, user_message, client_request_id,
                                                       self._instance_id,
                                                       self.attribution(principal, choice.model, messages))
        if made.duplicate:
            return made
        await self._decide_and_start(principal, _Plan(
            thread_id=user_message["thread_id"], user_message_id=user_message_id,
            message_id=made.assistant_message_id, choice=choice, messages=messages,
            turn=TurnInput(content=user_message["content"]), downgrade_to=self._settings.limits.downgrade_model,
            extra={"regenerated": True}), started)
        return made

    def _asked_for(self, last: dict[str, Any] | None) -> str | None:
        """The model a reply was asked for: before any downgrade or fallback; `random` if it was
        drawn; None (the default) if it was routed, or names a model no longer configured."""
        if last is None:
            return None
        meta = last["metadata"] or {}
        if meta.get("auto"):
            return None
        if meta.get("selected") == RANDOM:  # a new draw, as the first time
            return RANDOM
        asked = (meta.get("policy") or {}).get("downgraded_from") or meta.get("fallback_from") or last["model"]
        return asked if isinstance(asked, str) and asked in self._models else None

    async def begin_arena(self, principal: Principal, turn: TurnInput, requested: list[str] | None,
                          anonymous: bool, started: float | None = None) -> arena_store.ArenaTurn:
        """Persist the turn (the user message, both slots, the comparison), then decide and start
        each slot. No downgrade to a cheaper model here: the comparison is of the two models asked
        for (max_tokens may be clamped). A slot the policy stops is saved `refused`, the other runs;
        a comparison with a refused slot takes no vote (store/arena.py)."""
        if turn.client_message_id is not None:
            existing = await arena_store.find_duplicate(self._pool, principal.user_id, turn.client_message_id)
            if existing is not None:
                return existing
        messages = await self.conversation(principal, turn)
        request = ChatRequest(messages, extra=turn.extra)
        if requested is None:
            try:
                allowed = self._capable(request, limits_for(self._settings.limits, principal).models)
                pair = [m.name for m in self._models.draw_pair(allowed=allowed)]
            except NotEnoughModels as e:
                raise ServiceUnavailable(f"the arena needs two available models: {e}") from None
        else:
            pair = requested
            for model in pair:  # as a chat turn: a slot no link of its chain can express is a 400
                refused = refused_by_chain(self._models, model, request)
                if refused is not None:
                    raise BadRequest(refused.message)
        with tracing.span("gateway.rate_limit"):  # one request, one slot in the window
            await self._policy.admit_rate(principal)
        with tracing.span("gateway.persist"):
            stored = await arena_store.persist_arena_turn(
                self._pool, principal.user_id, turn.content, turn.client_message_id, turn.thread_id,
                self._instance_id, pair[0], pair[1], anonymous,
                (self.attribution(principal, pair[0], messages, turn.extra),
                 self.attribution(principal, pair[1], messages, turn.extra)))
        if stored.duplicate:
            return stored
        # both slots count toward the caller's limits: slot a may take at most half of what remains
        # today, slot b what is left after it. Each slot is its own generation, with its own chain
        # and timeouts: one failing or hanging never holds up the other
        for shares_left, slot, model, message_id in zip((2, 1), Slot, pair, (stored.message_a, stored.message_b),
                                                        strict=True):
            await self._decide_and_start(principal, _Plan(
                thread_id=stored.thread_id, user_message_id=stored.user_message["id"], message_id=message_id,
                choice=Route(model, None, None, auto=False), messages=list(messages), turn=turn,
                share=shares_left, slot=slot, anonymous=anonymous,
                extra={"comparison_id": str(stored.comparison_id)}), started)
        return stored

    def _capable(self, request: ChatRequest, allowed: Collection[str] | None) -> Collection[str] | None:
        """The models an arena pair may be drawn from for `request` (the whole conversation): among
        `allowed`, those whose chain can express it, when it uses anything beyond text. A 400 naming
        what cannot be expressed when fewer than two can."""
        if not turn_features(request):
            return allowed
        names = [name for name in self._models.models if allowed is None or name in allowed]
        capable = [name for name in names if refused_by_chain(self._models, name, request) is None]
        if len(self._models.drawable(capable)) < 2:
            refusals = (refused_by_chain(self._models, name, request) for name in names)
            refused = next((r for r in refusals if r is not None), None)
            why = f": {refused.message}" if refused is not None else ""
            raise BadRequest(f"the arena's pairing needs two models that can take this turn{why}")
        return capable

    async def _decide_and_start(self, principal: Principal, plan: _Plan, started: float | None,
                                early: Admission | None = None, noted: _Noted = "attribution") -> None:
        """Decide, after the commit: the policy approves (the reply starts), downgrades (it starts
        on less), or stops it (the row is saved `refused`, with the reason and when it clears, and
        no provider is called). One atomic admission, as strong as before the persist-first order.
        `early`: admitted already, from the caller's quota slice, its reservation on the row.
        `noted`: what the row's reservation holds already (see _Noted)."""
        admission: Admission | None = early
        refusal: TooManyRequests | Forbidden | None = None
        try:
            with tracing.span("gateway.policy") as decision:
                try:
                    admission = early or await self._policy.admit(
                        principal, plan.choice.model, prompt_tokens(plan.messages, plan.turn.extra),
                        plan.turn.max_tokens,
                        plan.downgrade_to, share=plan.share, rate=False)
                except (TooManyRequests, Forbidden) as e:
                    refusal = e
                action = "refuse" if admission is None else str(admission.action)
                decision.set_attribute("gateway.policy.action", action)
        except BaseException:
            await self._close_broken(plan)
            raise
        if admission is None:
            assert refusal is not None
            await self._refuse(plan, refusal)
            return
        extra: dict[str, Any] = dict(plan.extra)
        if plan.choice.complexity:
            extra["complexity"] = plan.choice.complexity
        if plan.choice.selected:  # model "random": the draw is named in the reply's metadata
            extra["selected"] = plan.choice.selected
        if admission.action == PolicyAction.DOWNGRADE:
            extra["policy"] = {"action": PolicyAction.DOWNGRADE, "reasons": admission.reasons,
                               "downgraded_from": admission.downgraded_from}
        turn = plan.turn
        self._generations.start(
            GenerationSpec(user_id=principal.user_id, api_key_id=principal.api_key_id, thread_id=plan.thread_id,
                           user_message_id=plan.user_message_id, message_id=plan.message_id,
                           category=plan.choice.category, auto=plan.choice.auto, extra_metadata=extra,
                           admission=admission, slot=plan.slot, anonymous=plan.anonymous),
            admission.model,
            ChatRequest(plan.messages, max_tokens=admission.max_tokens, temperature=turn.temperature,
                        top_p=turn.top_p, extra=dict(turn.extra)), started)
        if early is None and self._renote(admission, plan, noted):
            # added while the upstream call starts, not before it: only a live row takes it, so a
            # finish that gets there first is left alone (and has settled the reservation itself)
            try:
                await message_store.hold_reservation(self._pool, plan.message_id,
                                                     self.reservation(principal, admission, plan.messages,
                                                                      plan.turn.extra))
            except (asyncpg.PostgresError, OSError) as e:
                # only the sweep of a dead instance needs it: the reply runs and settles at its finish
                log.warning("reply %s: its reservation could not be noted on its row (%s)", plan.message_id,
                            type(e).__name__)

    @staticmethod
    def _renote(admission: Admission, plan: _Plan, noted: _Noted) -> bool:
        """Whether the row's reservation must be written again for `admission`: the persist statement
        wrote the attribution alone (or one for a prompt without the thread's history), and the
        sweep of a dead instance settles what the row names. A reply admitted from the slice its row
        names already is left alone: what the row understates stays on the slice's row, which that
        sweep releases too, so the caps stay exact (only its usage estimate counts less prompt)."""
        if noted == "attribution":
            return admission.holds_anything or admission.model != plan.choice.model
        if isinstance(noted, uuid.UUID):
            return admission.quota_id != noted or admission.model != plan.choice.model
        return True

    async def _refuse(self, plan: _Plan, e: TooManyRequests | Forbidden) -> None:
        """Save the policy's stop as the reply: status refused, the reason in its metadata and its
        `error` (which the stream sends, live or replayed, as an `error` event of type policy)."""
        if isinstance(e, TooManyRequests):
            reason = e.reason
            reset_at = e.reset_at.isoformat() if e.reset_at is not None else None
        else:
            reason, reset_at = "model_not_allowed", None
        message = e.message
        if plan.anonymous:  # an anonymous slot's model stays hidden until the vote
            config = self._models.models.get(plan.choice.model)
            message = mask_model_names(message, [config]) if config is not None else message
        # a cap clears (retry after reset_at); a model the key may not use does not
        retryable = reason != "model_not_allowed"
        error = {"type": "policy", "message": message, "retryable": retryable, "reason": reason,
                 "reset_at": reset_at}
        metadata: dict[str, Any] = {**plan.extra, "category": plan.choice.category, "auto": plan.choice.auto,
                                    "reason": reason, "reset_at": reset_at, "finish_reason": "refused"}
        if plan.anonymous:
            metadata["anonymous"] = True
        if plan.choice.complexity:
            metadata["complexity"] = plan.choice.complexity
        if plan.choice.selected:
            metadata["selected"] = plan.choice.selected
        await message_store.close_unstarted(self._pool, plan.message_id, status=MessageStatus.REFUSED,
                                            model=plan.choice.model, error=error, metadata=metadata)

    async def _close_broken(self, plan: _Plan) -> None:
        """Deciding failed after the commit (the database went away): the user message stays, the
        reply is saved failed (retryable, by regenerate) if the database lets us."""
        error = {"type": "internal_error", "message": "the reply could not be started", "retryable": True}
        try:
            await message_store.close_unstarted(self._pool, plan.message_id, status=MessageStatus.FAILED,
                                                model=plan.choice.model, error=error,
                                                metadata={**plan.extra, "finish_reason": "error"})
        except Exception as e:  # the sweep ends it as interrupted later
            log.warning("reply %s: could not be marked failed (%s)", plan.message_id, type(e).__name__)

    async def begin_completion(self, principal: Principal, model: str, request: ChatRequest,
                               started: float | None = None) -> Completion:
        """Decide for an OpenAI-route request (no rows: that route is stateless); `finish_completion`
        must follow, however the request ends."""
        choice = self.route(model, last_user_text(request.messages), principal)
        with tracing.span("gateway.policy") as decision:
            admission = await self._policy.admit(principal, choice.model,
                                                 prompt_tokens(request.messages, request.extra),
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
        if usage is None and not started and not chars:
            if not admission.holds_anything:
                tracing.end_chat()
                return  # nothing reached the client, nothing was reserved: nothing to count
            usage = UsageReport(0, 0, estimated=True)  # a zero record hands the reservation back
        else:
            # the upstream's counts when believable, else the estimate
            usage = charged_usage(completion.request, usage, chars)
        estimated = usage.estimated
        model = completion.chain.used
        record = UsageRecord(
            message_id=completion.id, user_id=principal.user_id, api_key_id=principal.api_key_id, model=model.name,
            provider=model.provider, prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
            estimated=estimated, cost_usd=cost_usd(model, usage), cached_tokens=usage.cached_tokens,
            cache_write_tokens=usage.cache_write_tokens, reasoning_tokens=usage.reasoning_tokens, **admission.held())
        self._record_usage(record)
        self._observer.usage(record)
        tracing.end_chat()

    def reservation(self, principal: Principal, admission: Admission, messages: list[dict[str, Any]],
                    extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """What a reply's admission holds, kept on its row until the finish: if its instance dies, the
        sweep settles the reservation to an estimate of what was consumed (store.instances)."""
        return {**admission.reservation_json(), **self.attribution(principal, admission.model, messages, extra)}

    def attribution(self, principal: Principal, model_name: str, messages: list[dict[str, Any]],
                    extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Who and what a reply is for, as the sweep estimates a dead instance's reply: written with
        the placeholder row (the persist step), before the policy decides."""
        model = self._models.models.get(model_name)
        return {"api_key_id": str(principal.api_key_id) if principal.api_key_id else None,
                "prompt_tokens": prompt_tokens(messages, extra), "model": model_name,
                "provider": model.provider if model else None,
                "input_price_per_mtok": model.input_price_per_mtok if model else 0.0,
                "output_price_per_mtok": model.output_price_per_mtok if model else 0.0}

    def route(self, requested: str | None, prompt: str, principal: Principal | None = None) -> Route:
        """Decide, part one: the router's advice (never touches the database). `model: random` draws
        only among the models `principal`'s key (narrowed through its chain) may use."""
        allowed = limits_for(self._settings.limits, principal).models if requested == RANDOM and principal else None
        draw = self._models.draw_name if allowed is None else partial(self._models.draw_name, allowed)
        return route(requested, prompt, self._models.router, self._models.default, draw)

    async def conversation(self, principal: Principal, turn: TurnInput) -> list[dict[str, Any]]:
        """What the upstream gets: the thread's history (NotFound if not the caller's), then the new
        message. Read before the commit: it bounds the prompt the policy reserves for (the arena)."""
        history = [] if turn.thread_id is None else await message_store.thread_history(
            self._pool, principal.user_id, turn.thread_id)
        return self.framed(turn, history)

    @staticmethod
    def framed(turn: TurnInput, history: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The turn's system prompt, the thread's history (its finished tool rounds), the turn's
        context, then its message (or its prompt's messages)."""
        messages: list[dict[str, Any]] = []
        if turn.system is not None:
            messages.append({"role": "system", "content": turn.system})
        prompt = turn.prompt
        if prompt is None:
            prompt = [{"role": "user", "content": turn.content if turn.parts is None else turn.parts}]
        if history:
            messages += closed_rounds(history, turn.context + prompt)
        messages += turn.context
        messages += prompt
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


def prompt_tokens(messages: list[dict[str, Any]], extra: dict[str, Any] | None = None) -> int:
    """The estimate the policy reserves for: everything sent upstream as the prompt (the messages
    with their images and tool calls, the tools, the response format: providers.base.prompt_estimate)."""
    return prompt_estimate(messages, extra)


def charged_usage(request: ChatRequest, usage: UsageReport | None, chars: int) -> UsageReport:
    """What a reply of `chars` characters is charged and reported: the upstream's `usage` when it is
    believable, else (none came, or a reply cut short) the estimate, flagged (providers.normalise.charged)."""
    return charged(request, usage, chars)


def last_user_text(messages: list[dict[str, Any]]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            return text_of(message.get("content"))
    return ""
