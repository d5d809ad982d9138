"""The native API's response bodies as typed structs: GET /openapi.json's schemas of what the handlers
answer (tests/contract/test_replies.py checks real answers of the running app against them).

The handlers still write their answers with orjson from the rows they read (the bytes on the wire
are theirs); these structs state those answers' shape. Fields a body may leave out are UNSET;
`kw_only` lets a struct list its fields in the order the body has them.
"""

from __future__ import annotations

import uuid
from datetime import date, datetime
from typing import Annotated, Any, Literal

from msgspec import UNSET, Meta, Struct, UnsetType, field

from gateway.vocabulary import MessageStatus, Winner

Slot = Literal["a", "b"]
# an aware datetime, written as RFC 3339 (`format: date-time`)
Time = Annotated[datetime, Meta(tz=True)]
Scope = Literal["chat", "arena", "admin"]


# -- errors ---------------------------------------------------------------------------------

class ErrorDetail(Struct, kw_only=True):
    type: Annotated[str, Meta(description="invalid_request, unauthorized, forbidden, not_found, conflict, "
                                          "rate_limited, payload_too_large, unavailable, ...")]
    message: str
    request_id: str
    retry_after: Annotated[int, Meta(description="429 only: seconds to wait")] | UnsetType = UNSET
    reset_at: Annotated[Time | None, Meta(description="429 only: when the limit resets")] | UnsetType = UNSET


class Error(Struct):
    """The native error body (every native endpoint's 4xx and 5xx)."""

    error: ErrorDetail


# -- messages and threads -------------------------------------------------------------------

class Message(Struct, kw_only=True):
    id: uuid.UUID
    thread_id: uuid.UUID
    role: Literal["user", "assistant", "system"]
    content: str
    status: MessageStatus
    reply_to: uuid.UUID | None
    slot: Slot | None
    client_message_id: str | None
    model: str | None
    provider: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    ttft_ms: int | None
    latency_ms: int | None
    error: dict[str, Any] | None
    metadata: dict[str, Any]
    created_at: Time
    finished_at: Time | None
    parts: Annotated[list[dict[str, Any]] | None,
                     Meta(description="A user message's content parts exactly as sent (content holds their text); "
                                      "null for a plain-text message")] | UnsetType = UNSET


class Thread(Struct, kw_only=True):
    id: uuid.UUID
    title: str | None
    created_at: Time
    updated_at: Time


class ThreadWithMessages(Thread, kw_only=True):
    messages: list[Message]


class ThreadPage(Struct):
    threads: list[Thread]
    next_cursor: str | None


class ChatAccepted(Struct, kw_only=True):
    status: Literal["accepted"]
    message: Message
    duplicate: bool
    thread_id: uuid.UUID
    assistant_message_id: uuid.UUID
    stream_url: Annotated[str, Meta(description="Follow the reply with EventSource (token included)")]


# -- the SSE events' data (edge/sse.py; an arena's carry their slot) ------------------------------

class ChatMetadata(Struct, kw_only=True):
    """The `metadata` event: where the turn is stored, and who answers it."""

    thread_id: uuid.UUID
    user_message_id: uuid.UUID
    message_id: uuid.UUID
    model: str | None
    provider: str | None
    category: str | None
    auto: bool
    fallback_from: str | None


class Delta(Struct, kw_only=True):
    delta: str


class UsageEvent(Struct, kw_only=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    estimated: bool | UnsetType = UNSET
    # the upstream's counts were out of range and clamped
    usage_suspect: bool | UnsetType = UNSET
    # the parts of prompt_tokens read from and written to a prompt cache (only when not zero)
    cached_tokens: int | UnsetType = UNSET
    cache_write_tokens: int | UnsetType = UNSET


class ReasoningEvent(Struct, kw_only=True):
    """A piece of the model's reasoning; `signature` closes its block when the upstream gives one."""

    delta: str
    signature: str | UnsetType = UNSET


class Done(Struct, kw_only=True):
    finish_reason: str
    message_id: uuid.UUID
    attempts: list[dict[str, Any]] | UnsetType = UNSET
    tool_calls: Annotated[list[dict[str, Any]],
                          Meta(description="The reply's whole tool calls ({id, type, function: {name, arguments}}), "
                                           "when it made any (only a request that declared tools can)")] | UnsetType = (
        UNSET)


class ErrorEvent(Struct, kw_only=True):
    type: str
    message: str
    retryable: bool
    # a policy stop (type "policy"): which limit, and when it clears
    reason: str | UnsetType = UNSET
    reset_at: Time | UnsetType | None = UNSET


class ArenaMetadata(ChatMetadata, kw_only=True):
    slot: Slot


class ArenaDelta(Delta, kw_only=True):
    slot: Slot


class ArenaUsage(UsageEvent, kw_only=True):
    slot: Slot


class ArenaReasoning(ReasoningEvent, kw_only=True):
    slot: Slot


class ArenaDone(Done, kw_only=True):
    slot: Slot


class ArenaError(ErrorEvent, kw_only=True):
    slot: Slot


# event name -> its data, for one message and for an arena comparison
MESSAGE_EVENTS: dict[str, type[Struct]] = {"metadata": ChatMetadata, "message": Delta, "reasoning": ReasoningEvent,
                                           "usage": UsageEvent, "done": Done, "error": ErrorEvent}
ARENA_EVENTS: dict[str, type[Struct]] = {"metadata": ArenaMetadata, "message": ArenaDelta,
                                         "reasoning": ArenaReasoning, "usage": ArenaUsage, "done": ArenaDone,
                                         "error": ArenaError}


# -- arena ----------------------------------------------------------------------------------

class SlotIds(Struct):
    a: uuid.UUID
    b: uuid.UUID


class ArenaAccepted(Struct, kw_only=True):
    status: Literal["accepted"]
    comparison_id: uuid.UUID
    message: Message
    duplicate: bool
    thread_id: uuid.UUID
    assistant_message_ids: SlotIds
    stream_url: str


class ComparisonSlot(Struct, kw_only=True):
    message_id: uuid.UUID
    status: MessageStatus
    model: str | None
    provider: str | None


class ComparisonSlots(Struct):
    a: ComparisonSlot
    b: ComparisonSlot


class Comparison(Struct, kw_only=True):
    id: uuid.UUID
    thread_id: uuid.UUID
    user_message_id: uuid.UUID
    anonymous: bool
    winner: Winner | None
    voted_at: Time | None
    created_at: Time
    slots: ComparisonSlots


class Rating(Struct, kw_only=True):
    model: str
    rating: float
    ci_low: float
    ci_high: float
    battles: int
    wins: float
    win_rate: float
    provisional: Annotated[bool, Meta(description="Fewer battles than `provisional_below`")]
    rating_lc: Annotated[float, Meta(description="Length-controlled rating")]
    lc_ci_low: float
    lc_ci_high: float


class Pair(Struct, kw_only=True):
    a: str
    b: str
    battles: int
    a_wins: Annotated[float, Meta(description="Wins of `a` over `b`, ties counting half")]


class Leaderboard(Struct, kw_only=True):
    models: list[Rating]
    pairs: list[Pair]
    length_effect: Annotated[float, Meta(description="Rating points a reply gains against one half its length")]
    provisional_below: int
    battles: int
    anonymous_only: bool
    fit_ms: float


# -- keys -----------------------------------------------------------------------------------

class Spent(Struct, kw_only=True):
    tokens: int
    cost_usd: float


class KeySpend(Struct, kw_only=True):
    today: Spent
    month: Spent
    total: Spent


class KeyInfo(Struct, kw_only=True):
    id: uuid.UUID
    user_id: uuid.UUID
    parent_id: Annotated[uuid.UUID | None,
                         Meta(description="The key that created it (null: made by the CLI, the bootstrap or a "
                                          "signed-in user); revoked with it")] | UnsetType = UNSET
    name: str
    prefix: str
    scopes: list[Scope]
    limits: dict[str, Any] | None
    expires_at: Time | None
    revoked_at: Time | None
    last_used_at: Time | None
    created_at: Time
    # what the key (with its descendants) has spent: GET /api/keys (docs/budgets.md)
    spend: KeySpend | UnsetType = UNSET


class CreatedKey(KeyInfo, kw_only=True):
    key: Annotated[str, Meta(description="Shown this once")]


class KeyList(Struct):
    keys: list[KeyInfo]


# -- account --------------------------------------------------------------------------------

class MeUser(Struct):
    id: uuid.UUID
    email: str | None


class MeKey(Struct):
    id: uuid.UUID
    scopes: list[str]


class MeLimits(Struct, kw_only=True):
    requests_per_minute: int | UnsetType | None = UNSET
    key_requests_per_minute: int | UnsetType | None = UNSET
    daily_tokens: int | UnsetType | None = UNSET
    key_daily_tokens: int | UnsetType | None = UNSET
    max_concurrent_streams: int | UnsetType | None = UNSET
    max_tokens: int | UnsetType | None = UNSET
    models: list[str] | UnsetType | None = UNSET


class Today(Struct, kw_only=True):
    day: date
    tokens: int
    reserved: int
    requests: int
    cost_usd: float
    active_streams: int


class Remaining(Struct):
    daily_tokens: int | None


class MeBudget(Struct, kw_only=True):
    """One month or lifetime budget in force for the caller (docs/budgets.md)."""

    subject: Annotated[Literal["user", "key"], Meta(description="The user's, from [limits]; or a key's of the "
                                                                 "caller's chain (its use counts its subtree's)")]
    key_id: uuid.UUID | None
    window: Literal["monthly_tokens", "monthly_cost_usd", "total_tokens", "total_cost_usd"]
    period: Annotated[str, Meta(description="The UTC month, YYYY-MM, or `total` (for life)")]
    limit: float
    used: Annotated[float, Meta(description="Settled use")]
    reserved: Annotated[float, Meta(description="Held by replies still running")]
    remaining: Annotated[float, Meta(description="limit - used - reserved, at least 0")]


class BudgetRemaining(Struct, kw_only=True):
    """What the caller may still spend in each window: the least any budget in force leaves (null: none)."""

    monthly_tokens: int | None
    monthly_cost_usd: float | None
    total_tokens: int | None
    total_cost_usd: float | None


class Me(Struct):
    user: MeUser
    key: MeKey | None
    limits: MeLimits
    today: Today
    remaining: Remaining
    budgets: list[MeBudget]
    budget_remaining: BudgetRemaining


class UsageCounts(Struct, kw_only=True):
    prompt_tokens: Annotated[int, Meta(description="Every prompt token: input + cached + cache write")]
    input_tokens: Annotated[int, Meta(description="Prompt tokens read neither from nor into a cache")]
    cached_tokens: int
    cache_write_tokens: int
    completion_tokens: Annotated[int, Meta(description="Output tokens, reasoning included")]
    reasoning_tokens: int
    total_tokens: int
    cost_usd: float
    requests: int


class UsageRow(UsageCounts, kw_only=True):
    day: date | UnsetType = UNSET
    model: str | UnsetType = UNSET
    key: Annotated[uuid.UUID | None,
                   Meta(description="The reply's API key (null: a signed-in user's)")] | UnsetType = UNSET


class UsageReport(Struct, kw_only=True):
    from_: date = field(name="from")
    to: date
    group_by: Literal["day", "model", "day,model", "key", "day,key"]
    rows: list[UsageRow]
    totals: UsageCounts


# -- ops ------------------------------------------------------------------------------------

class Status(Struct, kw_only=True):
    status: Literal["ok", "unavailable"]
    database: str | UnsetType = UNSET
    pending_migrations: list[str] | UnsetType = UNSET
    redis: Literal["ok", "degraded"] | UnsetType = UNSET  # with REDIS_URL only


# the replies every native operation may name (their schemas are generated, with what they refer to)
REPLIES: tuple[type[Struct], ...] = (Error, Message, Thread, ThreadWithMessages, ThreadPage, ChatAccepted,
                                     ArenaAccepted, Comparison, Leaderboard, KeyInfo, CreatedKey, KeyList, Me,
                                     UsageReport, Status, *MESSAGE_EVENTS.values(), *ARENA_EVENTS.values())
