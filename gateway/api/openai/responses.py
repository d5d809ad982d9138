"""The OpenAI Responses API front door: `POST /v1/responses`, `GET` and `DELETE /v1/responses/{id}`.

Upstreams stay chat-completions/Anthropic: a request becomes a chat turn (OpenAI-style messages),
and the reply's deltas, usage and finish become the Responses API's objects and semantic events.
Same auth, router, policy, chain and exactly-once accounting as the other front doors.

State maps onto threads:

    store: true (default)   the turn is persisted in a thread exactly as POST /api/chat persists
                            one: its prompt is the last input message (a user message), or the
                            tool round the input ends with (see `stored_prompt`); `instructions`
                            and the earlier input items go to the upstream for this turn only
    previous_response_id    continues that response's thread (the caller's own, else 404); when that
                            reply called tools, the input answers each call (function_call_output),
                            and answers no call that is neither that reply's nor an earlier item's
    GET  /v1/responses/{id} the reply, rebuilt from its row (request parameters are not stored:
                            `instructions`, `tools`, sampling come back as their defaults)
    DELETE                  the turn (its user message and the reply) and the thread too when
                            nothing else is left in it; the usage row stays (accounting outlives content)
    store: false            stateless like POST /v1/chat/completions: no rows, usage recorded once

A stored response's id is its assistant message's: `resp_<uuid hex>`, its message item
`msg_<uuid hex>`. Function tools are translated to chat-completions tools and passed through;
the upstream's tool calls come back as `function_call` items (`fc_<uuid hex>_<index>`). A stored
reply keeps its calls (the reply's `metadata.tool_calls`) and a stored tool round its canonical
messages (the user message's `metadata.messages`): the thread's history gives them back to the
next turn, which each provider adapter renders in its own shape.

A failure before any output is an HTTP error in OpenAI's shape (nothing was streamed yet);
after it, a stream ends with `response.failed` carrying the response and its `error`.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from gateway.api.common import caller, json_response, read_body, sse_stream
from gateway.api.content import parse_content
from gateway.api.openai.chat_completions import (
    OpenAIError,
    openai_errors,
    provider_error,
)
from gateway.api.openai.ratelimits import RateLimitHeaders
from gateway.contract import decoding
from gateway.contract import responses as contract
from gateway.contract.operations import (
    errors,
    json_content,
    ok,
    openai_error_answers,
    operation,
    path_string,
    query,
    response,
    sse_content,
)
from gateway.edge.auth import Principal
from gateway.errors import BadRequest, NotFound
from gateway.generation.events import DELTA
from gateway.providers import turn as canonical
from gateway.providers.base import (
    Batch,
    ChatRequest,
    Finish,
    ProviderError,
    ReasoningDelta,
    TextDelta,
    ToolCallDelta,
    UsageReport,
    text_of,
)
from gateway.providers.chain import refused_by_chain
from gateway.service.router import AUTO
from gateway.service.turns import Reply, TurnInput, charged_usage
from gateway.state import DB, MODELS, TIMINGS, TURNS
from gateway.store import messages as message_store
from gateway.vocabulary import MessageStatus

ID_PREFIX = "resp_"
MESSAGE_ROLES = frozenset({"user", "assistant", "system", "developer"})
TEXT_PARTS = frozenset({"input_text", "output_text"})


@dataclass(slots=True, kw_only=True)
class ResponsesRequest:
    """A validated `POST /v1/responses` body, its input already chat messages."""

    model: str
    messages: list[dict[str, Any]]
    origins: list[int]  # the input item each message came from
    instructions: str | None
    max_output_tokens: int | None
    temperature: float | None
    top_p: float | None
    extra: dict[str, Any]  # for the upstream: translated tools, tool_choice, ...
    stream: bool
    store: bool
    # with store: the index of the first message of the stored prompt (the ones before are context)
    prompt_at: int
    previous_response_id: str | None
    # what the response object repeats of the request
    echo: dict[str, Any] = field(default_factory=dict)


def _text(value: Any, param: str) -> str:
    if not isinstance(value, str):
        raise OpenAIError(400, f"'{param}' must be a string", param=param)
    if "\x00" in value:
        raise OpenAIError(400, f"'{param}' must not contain NUL", param=param)
    return value


def _content(content: Any, param: str) -> str | list[dict[str, Any]]:
    """A message's content as a chat message carries it: text parts as one string; with an
    `input_image` part, chat content parts (text, image_url), checked as POST /api/chat checks them."""
    if isinstance(content, str):
        return _text(content, param)
    if not isinstance(content, list) or not content:
        raise OpenAIError(400, f"'{param}' must be a string or a non-empty array of parts", param=param)
    texts, parts = [], []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "input_image":
            image = {"url": part.get("image_url")}
            if part.get("detail") is not None:
                image["detail"] = part["detail"]
            parts.append({"type": "image_url", "image_url": image})
            continue
        if not isinstance(kind, str) or kind not in TEXT_PARTS:
            raise OpenAIError(400, f"'{param}[{j}]' must be an input_text, output_text or input_image part (other "
                                   "parts are not supported)", param=f"{param}[{j}]")
        texts.append(_text(part.get("text"), f"{param}[{j}].text"))
        parts.append({"type": "text", "text": texts[-1]})
    if len(parts) == len(texts):
        return "".join(texts)
    try:
        parse_content(parts)
    except BadRequest as e:  # the native check, in this door's words
        raise OpenAIError(400, e.message.replace("content[", f"{param}[").replace(".image_url.url", ".image_url"),
                          param=param) from None
    return parts


def _function_call(item: dict[str, Any], param: str) -> dict[str, Any]:
    """A `function_call` item (the model's call, sent back as context) as a chat tool call."""
    for key in ("call_id", "name", "arguments"):
        _text(item.get(key), f"{param}.{key}")
    return {"id": item["call_id"], "type": "function",
            "function": {"name": item["name"], "arguments": item["arguments"]}}


def parse_input(raw: Any, origins: list[int] | None = None) -> list[dict[str, Any]]:
    """`input` (a string, or items) as chat messages; `developer` becomes `system`, which every
    upstream understands. Besides messages, the tool loop's items are taken: `function_call`
    (consecutive ones are one assistant message with several tool calls) and
    `function_call_output` (a `tool` message). Any other item type is a 400 that names it.
    `origins` (when given) gets the input index each message came from."""
    origins = [] if origins is None else origins
    if isinstance(raw, str):
        if not raw.strip():
            raise OpenAIError(400, "'input' must not be empty", param="input")
        origins.append(0)
        return [{"role": "user", "content": _text(raw, "input")}]
    if not isinstance(raw, list) or not raw:
        raise OpenAIError(400, "'input' must be a string or a non-empty array of items", param="input")
    messages: list[dict[str, Any]] = []
    for i, item in enumerate(raw):
        param = f"input[{i}]"
        kind = item.get("type", "message") if isinstance(item, dict) else None
        if kind == "function_call":
            call = _function_call(item, param)
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and last.get("tool_calls"):
                last["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
                origins.append(i)
            continue
        if kind == "function_call_output":
            origins.append(i)
            messages.append({"role": "tool", "tool_call_id": _text(item.get("call_id"), f"{param}.call_id"),
                             "content": _text(item.get("output"), f"{param}.output")})
            continue
        if isinstance(kind, str) and kind != "message":
            raise OpenAIError(400, f"'{param}' is a {kind[:40]!r} item: only message, function_call and "
                                   "function_call_output items are supported", param=param)
        # a str first: an unhashable role would make the set lookup raise (a 500)
        if (not isinstance(item, dict) or kind != "message"
                or not isinstance(item.get("role"), str) or item["role"] not in MESSAGE_ROLES):
            raise OpenAIError(400, f"'{param}' must be a message item with role user, assistant, system or "
                                   "developer", param=param)
        role = "system" if item["role"] == "developer" else item["role"]
        origins.append(i)
        messages.append({"role": role, "content": _content(item.get("content"), f"{param}.content")})
    return messages


def parse_tools(tools: Any, choice: Any) -> dict[str, Any]:
    """Responses-style function tools and tool_choice, as chat-completions fields."""
    extra: dict[str, Any] = {}
    if tools is not None:
        if not isinstance(tools, list):
            raise OpenAIError(400, "'tools' must be an array", param="tools")
        translated = []
        for i, tool in enumerate(tools):
            if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("name"), str):
                raise OpenAIError(400, f"'tools[{i}]' must be a function tool with a name (other tool types are "
                                       "not supported)", param=f"tools[{i}]")
            function = {k: tool[k] for k in ("name", "description", "parameters", "strict") if k in tool}
            translated.append({"type": "function", "function": function})
        if translated:
            extra["tools"] = translated
    if choice is not None:
        if isinstance(choice, str) and choice in ("auto", "none", "required"):
            extra["tool_choice"] = choice
        elif isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("name"), str):
            extra["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
        else:
            raise OpenAIError(400, "'tool_choice' must be auto, none, required or a function", param="tool_choice")
    return extra


_refuse = contract.refusal(lambda message, param: OpenAIError(400, message, param=param))


def _not_json() -> OpenAIError:
    return OpenAIError(400, "body is not valid JSON")


def parse_request(raw: bytes, known_model: Callable[[str], bool]) -> ResponsesRequest:
    """Everything checked before anything is read or written; an OpenAIError names the bad parameter."""
    body = decoding.decode(raw, contract.CreateResponse, _refuse, _not_json)
    model = body.model
    if model != AUTO and not known_model(model):
        raise OpenAIError(404, f"The model '{model}' does not exist", param="model", code="model_not_found")
    origins: list[int] = []
    messages = parse_input(body.input, origins)
    instructions = body.instructions
    if instructions is not None:
        _text(instructions, "instructions")
    max_output_tokens = body.max_output_tokens
    stream, store = bool(body.stream), body.store is not False
    prompt_at = stored_prompt(messages) if store else len(messages)
    previous = body.previous_response_id
    if previous is not None:
        _text(previous, "previous_response_id")
    metadata = body.metadata
    extra = parse_tools(body.tools, body.tool_choice)
    if body.parallel_tool_calls is not None:
        extra["parallel_tool_calls"] = body.parallel_tool_calls
    if body.user is not None:
        extra["user"] = _text(body.user, "user")
    if body.reasoning is not None and body.reasoning.effort is not None:
        extra["reasoning_effort"] = body.reasoning.effort
    temperature, top_p = body.temperature, body.top_p
    echo = {"instructions": instructions, "max_output_tokens": max_output_tokens, "metadata": metadata or {},
            "parallel_tool_calls": True if body.parallel_tool_calls is None else body.parallel_tool_calls,
            "previous_response_id": previous, "store": store, "temperature": temperature,
            "tool_choice": "auto" if body.tool_choice is None else body.tool_choice,
            "tools": body.tools or [], "top_p": top_p, "user": body.user}
    return ResponsesRequest(model=model, messages=messages, origins=origins, instructions=instructions,
                            max_output_tokens=max_output_tokens, temperature=temperature, top_p=top_p, extra=extra,
                            stream=stream, store=store, prompt_at=prompt_at, previous_response_id=previous,
                            echo=echo)


def stored_prompt(messages: list[dict[str, Any]]) -> int:
    """Where the prompt a stored turn keeps begins: a stored turn is a prompt and its reply. The
    prompt is the input's last user message, with the tools' results (function_call_output items)
    right before it; or, when the input ends with tools' results, those, and the function_call
    items they answer and the user message before those when the input holds them too (a tool
    round sent whole). The items before the prompt go to the upstream for this turn only."""
    end = start = len(messages)
    if messages[-1]["role"] == "user":
        start -= 1
    results = start
    while start > 0 and messages[start - 1]["role"] == "tool":
        start -= 1
    if start == end:
        raise OpenAIError(400, "with store: true the last input item must be a user message or a "
                               "function_call_output", param="input")
    if start < results and start > 0 and messages[start - 1].get("tool_calls"):
        start -= 1
        if start > 0 and messages[start - 1]["role"] == "user":
            start -= 1
    return start


def unanswered(calls: list[dict[str, Any]], messages: list[dict[str, Any]]) -> OpenAIError | None:
    """The previous response's tool calls must each get their result: a thread never holds a call
    without it (no upstream would take the next turn). OpenAI's own words."""
    answered = {m.get("tool_call_id") for m in messages if m["role"] == "tool"}
    for call in calls:
        if call["id"] not in answered:
            return OpenAIError(400, f"No tool output found for function call {call['id']}.", param="input")
    return None


def input_error(e: canonical.TurnError, origins: list[int]) -> OpenAIError:
    """A malformed turn's error, its `messages[i]` named as the input item it came from."""
    found = re.match(r"messages\[(\d+)\]", e.param)
    if found is None:
        return OpenAIError(400, e.message, param=e.param)
    where = f"input[{origins[int(found.group(1))]}]"
    return OpenAIError(400, e.message.replace(found.group(0), where), param=e.param.replace(found.group(0), where))


def parse_response_id(raw: str, param: str | None = None) -> uuid.UUID:
    """`resp_<hex>` to the assistant message's id; anything else names no response (404)."""
    if raw.startswith(ID_PREFIX):
        try:
            return uuid.UUID(hex=raw[len(ID_PREFIX):])
        except ValueError:
            pass
    raise _not_found(raw, param)


def _not_found(raw: str, param: str | None) -> OpenAIError:
    what = "Previous response" if param else "Response"
    return OpenAIError(404, f"{what} with id '{raw}' not found.", param=param,
                       code="previous_response_not_found" if param else None)


# -- the response object ------------------------------------------------------------------------

@dataclass(slots=True, kw_only=True)
class Shape:
    """What every rendering of one response shares: ids, creation time, model, the request's echo."""

    id: uuid.UUID
    created_at: int
    model: str
    echo: dict[str, Any]

    @property
    def response_id(self) -> str:
        return ID_PREFIX + self.id.hex

    @property
    def message_id(self) -> str:
        return "msg_" + self.id.hex

    def body(self, status: str, output: list[dict[str, Any]], usage: UsageReport | None = None,
             error: dict[str, Any] | None = None, incomplete: dict[str, Any] | None = None) -> dict[str, Any]:
        echo = self.echo
        return {
            "id": self.response_id, "object": "response", "created_at": self.created_at, "status": status,
            "background": False, "completed_at": int(time.time()) if status == "completed" else None,
            "error": error, "incomplete_details": incomplete, "instructions": echo.get("instructions"),
            "max_output_tokens": echo.get("max_output_tokens"), "metadata": echo.get("metadata", {}),
            "model": self.model, "output": output, "parallel_tool_calls": echo.get("parallel_tool_calls", True),
            "previous_response_id": echo.get("previous_response_id"),
            "reasoning": {"effort": None, "summary": None}, "store": echo.get("store", True),
            "temperature": echo.get("temperature"), "text": {"format": {"type": "text"}},
            "tool_choice": echo.get("tool_choice", "auto"), "tools": echo.get("tools", []),
            "top_p": echo.get("top_p"), "truncation": "disabled",
            "usage": usage_json(usage) if usage is not None else None,
            # not in OpenAI's wire object (its SDKs compute it): here for clients without an SDK
            "output_text": "".join(part["text"] for item in output if item["type"] == "message"
                                   for part in item["content"] if part["type"] == "output_text"),
        } | ({"user": echo["user"]} if echo.get("user") is not None else {})  # a string when given, else absent

    def message(self, text: str | None, status: str) -> dict[str, Any]:
        content = [] if text is None else [text_part(text)]
        return {"id": self.message_id, "type": "message", "status": status, "role": "assistant", "content": content}

    def reasoning(self, blocks: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The model's reasoning as reasoning items: its text as reasoning_text content, the
        signature an upstream closed it with (Anthropic's) as `encrypted_content`."""
        return [{"id": f"rs_{self.id.hex}_{i}", "type": "reasoning", "summary": [],
                 "content": [{"type": "reasoning_text", "text": block["text"]}],
                 "encrypted_content": block["signature"] or None, "status": "completed"}
                for i, block in enumerate(blocks)]

    def function_calls(self, calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Whole tool calls (canonical) as function_call items; a call without an id gets the one a
        stored reply saves it with (generation/task.py)."""
        return [{"id": f"fc_{self.id.hex}_{i}", "type": "function_call", "status": "completed",
                 "call_id": call["id"] or f"call_{self.id.hex}_{i}", "name": call["function"]["name"],
                 "arguments": call["function"]["arguments"]}
                for i, call in enumerate(calls)]


def text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def usage_json(usage: UsageReport) -> dict[str, Any]:
    """The Responses API's usage: input_tokens counts every prompt token, of which the details name
    those read from and written to a prompt cache; output_tokens includes the reasoning tokens."""
    return {"input_tokens": usage.prompt_tokens,
            "input_tokens_details": {"cached_tokens": usage.cached_tokens,
                                     "cache_write_tokens": usage.cache_write_tokens},
            "output_tokens": usage.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
            "total_tokens": usage.prompt_tokens + usage.completion_tokens}


def outcome(finish_reason: str) -> tuple[str, dict[str, Any] | None]:
    """A finished reply's status and incomplete_details."""
    if finish_reason == "length":
        return "incomplete", {"reason": "max_output_tokens"}
    if finish_reason == MessageStatus.CANCELLED:
        return "cancelled", None
    if finish_reason == "content_filter":
        return "incomplete", {"reason": "content_filter"}
    return "completed", None


def failure(e: ProviderError) -> dict[str, Any]:
    return {"code": "rate_limit_exceeded" if e.status == 429 else "server_error", "message": e.message}


# -- handlers ----------------------------------------------------------------------------------

STARTING_AFTER_MAX = 2**31 - 1
RESPONSE_ID = path_string("response_id", "The response's id (resp_<hex>)")
RESPONSE_ANSWER = {**json_content(contract.Response), **sse_content("ResponseEvent")}


@operation("OpenAI Responses API: create a response (stream and non-stream)", "openai",
           {"200": response("The response; its semantic events when `stream` is true", RESPONSE_ANSWER),
            **openai_error_answers(400, 401, 403, 404, 413, 429)},
           body=contract.CreateResponse,
           description="With store: true (the default) the turn is persisted in a thread like POST /api/chat's; "
                       "previous_response_id continues it. With store: false it is stateless like "
                       "/v1/chat/completions. Errors are in OpenAI's shape.")
@openai_errors
async def create_response(request: web.Request) -> web.StreamResponse:
    principal = await caller(request, "chat")
    app = request.app
    models = app[MODELS]
    req = parse_request(await read_body(request), models.chat_model)
    thread_id = None
    calls: list[dict[str, Any]] = []  # the previous reply's tool calls, which this input answers
    if req.previous_response_id is not None:
        message_id = parse_response_id(req.previous_response_id, "previous_response_id")
        row = await _reply_row(request, principal, message_id, req.previous_response_id, "previous_response_id")
        thread_id = row["thread_id"]
        calls = row["metadata"].get("tool_calls") or []
    check = ChatRequest(req.messages, extra=req.extra)
    try:
        canonical.check(check, [call["id"] for call in calls])
    except canonical.TurnError as e:
        raise input_error(e, req.origins) from None
    missing = unanswered(calls, req.messages)
    if missing is not None:
        raise missing
    if req.model != AUTO:  # before anything is reserved or written (a stored turn writes its rows first)
        refused = refused_by_chain(models, req.model, check)
        if refused is not None:
            raise provider_error(refused)
    if req.store:
        return await _stored(request, principal, req, thread_id)
    return await _stateless(request, principal, req, thread_id)


async def _reply_row(request: web.Request, principal: Principal, message_id: uuid.UUID, raw: str,
                     param: str | None = None) -> dict[str, Any]:
    try:
        row = await message_store.get_message(request.app[DB].pool, principal.user_id, message_id)
    except NotFound:
        raise _not_found(raw, param) from None
    if row["role"] != "assistant" or row["slot"] is not None:
        raise _not_found(raw, param)
    return row


async def _stored(request: web.Request, principal: Principal, req: ResponsesRequest,
                  thread_id: uuid.UUID | None) -> web.StreamResponse:
    turns = request.app[TURNS]
    prompt = req.messages[req.prompt_at:]
    if len(prompt) == 1 and prompt[0]["role"] == "user":  # stored as POST /api/chat stores one
        content = prompt[0]["content"]
        text, parts, whole = text_of(content), content if isinstance(content, list) else None, None
    else:  # a tool round: its messages are kept with the text of its user messages
        text = "\n\n".join(text_of(m["content"]) for m in prompt if m["role"] == "user")
        parts, whole = None, prompt
    turn = TurnInput(content=text, parts=parts, prompt=whole, thread_id=thread_id, model=req.model,
                     max_tokens=req.max_output_tokens, temperature=req.temperature, top_p=req.top_p,
                     system=req.instructions, context=req.messages[:req.prompt_at], extra=req.extra)
    # shielded: once the user message is committed its generation must start, client gone or not
    stored = await asyncio.shield(turns.begin_chat(principal, turn, request[TIMINGS].start))
    reply = await turns.reply(principal.user_id, stored.assistant_message_id)
    shape = Shape(id=stored.assistant_message_id, created_at=int(stored.user_message["created_at"].timestamp()),
                  model=req.model, echo=req.echo)
    source = _ReplyEvents(reply)
    limits = RateLimitHeaders(request, principal)
    try:
        return await _respond(request, shape, source.batches(), req.stream, _Reply(), lambda: source.model,
                              limits)
    except ProviderError as e:
        raise _http_error(e) from None
    finally:
        limits.close()


async def _stateless(request: web.Request, principal: Principal, req: ResponsesRequest,
                     thread_id: uuid.UUID | None) -> web.StreamResponse:
    turns = request.app[TURNS]
    # the history (if any) and this input, no stored turn
    messages = await turns.conversation(principal, TurnInput(content="", thread_id=thread_id,
                                                             system=req.instructions, prompt=req.messages))
    chat = ChatRequest(messages, max_tokens=req.max_output_tokens, temperature=req.temperature, top_p=req.top_p,
                       extra=req.extra)
    completion = await turns.begin_completion(principal, req.model, chat, request[TIMINGS].start)
    shape = Shape(id=completion.id, created_at=int(time.time()), model=req.model, echo=req.echo)
    reply = _Reply()
    limits = RateLimitHeaders(request, principal)
    try:
        async with aclosing(completion.chain.stream(chat, whole=not req.stream)) as events:
            return await _respond(request, shape, events, req.stream, reply, lambda: completion.chain.used.name,
                                  limits, chat)
    except ProviderError as e:
        raise _http_error(e) from None
    finally:
        limits.close()
        turns.finish_completion(completion, reply.usage, reply.chars, reply.started)


def _http_error(e: ProviderError) -> OpenAIError:
    if e.kind == "upstream_timeout":  # a stored reply's error says only its kind
        return OpenAIError(504, e.message, "timeout_error", code="upstream_timeout")
    if e.kind == "policy":  # stored and refused (the turn is kept): answered as a limit, as before
        if isinstance(e, _ReplyFailed) and e.reason == "model_not_allowed":
            return OpenAIError(403, e.message, "forbidden")
        return OpenAIError(429, e.message, "rate_limit_error", code="rate_limit_exceeded")
    return provider_error(e)


class _ReplyFailed(ProviderError):
    """A stored reply's `error` event, as the provider error it was."""

    def __init__(self, data: dict[str, Any]) -> None:
        super().__init__(str(data.get("message", "the reply failed")))
        self.kind = str(data.get("type", "provider_error"))
        self.reason = data.get("reason")  # a policy stop's


class _ReplyEvents:
    """A stored reply's events as the provider events the stateless path sees."""

    def __init__(self, reply: Reply) -> None:
        self.reply = reply
        self.model = ""

    async def batches(self) -> AsyncIterator[Batch]:
        async for events in self.reply.events(-1):
            batch: Batch = []
            for event in events:
                if event.name == DELTA:
                    batch.append(TextDelta(orjson.loads(event.data)["delta"]))
                    continue
                data = orjson.loads(event.data)
                if event.name == "metadata":
                    self.model = data["model"] or ""
                elif event.name == "reasoning":
                    batch.append(ReasoningDelta(data["delta"], data.get("signature")))
                elif event.name == "usage":
                    batch.append(UsageReport(data["prompt_tokens"], data["completion_tokens"],
                                             cached_tokens=data.get("cached_tokens", 0),
                                             cache_write_tokens=data.get("cache_write_tokens", 0)))
                elif event.name == "done":
                    calls = data.get("tool_calls")
                    if calls:
                        batch.append(ToolCallDelta([{"index": i, **call} for i, call in enumerate(calls)]))
                    batch.append(Finish(data["finish_reason"]))
                elif event.name == "error":
                    if batch:
                        yield batch
                    raise _ReplyFailed(data)
            if batch:
                yield batch


class _Reply:
    """What came back so far (text, tool calls, usage, finish), and whether any of it went out."""

    __slots__ = ("parts", "chars", "calls", "usage", "finish", "started", "reasoning")

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.chars = 0
        self.calls: list[dict[str, Any]] = []
        self.reasoning: list[dict[str, Any]] = []  # {"text", "signature"} per reasoning block
        self.usage: UsageReport | None = None
        self.finish = "stop"
        self.started = False

    def take(self, event: Any) -> None:
        kind = type(event)
        if kind is TextDelta:
            self.parts.append(event.text)
            self.chars += len(event.text)
        elif kind is ToolCallDelta:
            self.calls.extend(event.calls)
        elif kind is ReasoningDelta:
            if event.redacted is not None:
                return  # nothing to show; it goes back to the upstream only through /v1/messages
            if not self.reasoning or self.reasoning[-1]["signature"]:
                self.reasoning.append({"text": "", "signature": ""})
            self.reasoning[-1]["text"] += event.text
            if event.signature:
                self.reasoning[-1]["signature"] = event.signature
        elif kind is UsageReport:
            self.usage = event
        elif kind is Finish:
            self.finish = event.reason


async def _respond(request: web.Request, shape: Shape, events: AsyncIterator[Batch], stream: bool, reply: _Reply,
                   model: Callable[[], str], limits: RateLimitHeaders | None = None,
                   chat: ChatRequest | None = None, starting_after: int = -1) -> web.StreamResponse:
    # nothing is sent until the first batch is in: a failure before it is a clean HTTP error, and
    # the response names the model that actually answers
    batch: Batch | None = await anext(events, None)
    shape.model = model() or shape.model
    if not stream:
        while batch is not None:
            for event in batch:
                reply.take(event)
            batch = await anext(events, None)
        answer = json_response(_finished(shape, reply, chat))
        if limits is not None:
            await limits.apply(answer)
        return answer
    resp = sse_stream()
    if limits is not None:
        await limits.apply(resp)
    await resp.prepare(request)
    reply.started = True
    request[TIMINGS].mark("first_token")
    out = _Frames(shape, starting_after)
    frames = [out.lifecycle("response.created", "in_progress"), out.lifecycle("response.in_progress", "in_progress")]
    try:
        try:
            while batch is not None:
                for event in batch:
                    reply.take(event)
                    if type(event) is TextDelta:
                        if not out.open:
                            frames.extend(out.open_message())
                        frames.append(out.delta(event.text))
                if frames:
                    data = b"".join(frames)
                    if data:  # a resumed retrieve's skipped events are empty
                        await resp.write(data)
                    frames.clear()
                batch = await anext(events, None)
            frames.extend(out.close(reply, chat))
        except ProviderError as e:
            output = [shape.message("".join(reply.parts), "incomplete")] if out.open else []
            frames.append(out.event("response.failed", {"response": shape.body("failed", output, error=failure(e))}))
        await resp.write(b"".join(frames))
        await resp.write_eof()
    except ConnectionResetError:
        pass  # the client left: a stored reply runs on; a stateless one is cut as the handler returns
    return resp


def _finished(shape: Shape, reply: _Reply, chat: ChatRequest | None) -> dict[str, Any]:
    output = []
    text = "".join(reply.parts)
    if text or not reply.calls:
        output.append(shape.message(text, "completed"))
    output.extend(shape.function_calls(canonical.merge_calls(reply.calls)))
    # after the message, which a stream opens at output_index 0 with its first text
    output.extend(shape.reasoning(reply.reasoning))
    status, incomplete = outcome(reply.finish)
    usage = reply.usage
    if chat is not None:  # the stateless path; a stored reply reports what its row was charged
        usage = charged_usage(chat, usage, reply.chars)
    return shape.body(status, output, usage, incomplete=incomplete)


class _Frames:
    """The semantic events of one streamed response, numbered by `sequence_number`."""

    __slots__ = ("shape", "seq", "open", "_delta_head", "_skip_through")

    def __init__(self, shape: Shape, starting_after: int = -1) -> None:
        self.shape = shape
        self.seq = 0
        # a resumed retrieve: events up to this sequence_number are made (to count) but not sent
        self._skip_through = starting_after
        self.open = False  # the message item has been added
        # a delta frame is this, the text's JSON string, the sequence number: the per-token path
        self._delta_head = (b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta",'
                            b'"item_id":"' + shape.message_id.encode() + b'","output_index":0,"content_index":0,'
                            b'"logprobs":[],"delta":')

    def event(self, name: str, data: dict[str, Any]) -> bytes:
        self.seq += 1
        if self.seq - 1 <= self._skip_through:
            return b""
        return b"event: %s\ndata: %s\n\n" % (name.encode(), orjson.dumps(
            {"type": name, **data, "sequence_number": self.seq - 1}))

    def lifecycle(self, name: str, status: str) -> bytes:
        return self.event(name, {"response": self.shape.body(status, [])})

    def open_message(self) -> list[bytes]:
        self.open = True
        shape = self.shape
        return [self.event("response.output_item.added",
                           {"output_index": 0, "item": shape.message(None, "in_progress")}),
                self.event("response.content_part.added", {"item_id": shape.message_id, "output_index": 0,
                                                           "content_index": 0, "part": text_part("")})]

    def delta(self, text: str) -> bytes:
        self.seq += 1
        if self.seq - 1 <= self._skip_through:
            return b""
        return b'%s%s,"sequence_number":%d}\n\n' % (self._delta_head, orjson.dumps(text), self.seq - 1)

    def close(self, reply: _Reply, chat: ChatRequest | None) -> list[bytes]:
        shape = self.shape
        body = _finished(shape, reply, chat)
        frames = []
        if body["output"] and body["output"][0]["type"] == "message" and not self.open:
            frames.extend(self.open_message())  # an empty reply still has its (empty) message
        for index, item in enumerate(body["output"]):
            if item["type"] == "message":
                text = item["content"][0]["text"]
                where = {"item_id": shape.message_id, "output_index": index, "content_index": 0}
                frames += [self.event("response.output_text.done", {**where, "text": text, "logprobs": []}),
                           self.event("response.content_part.done", {**where, "part": text_part(text)})]
            elif item["type"] == "reasoning":
                frames.append(self.event("response.output_item.added", {"output_index": index, "item": item}))
            else:
                frames += [self.event("response.output_item.added", {"output_index": index,
                                                                     "item": {**item, "arguments": "",
                                                                              "status": "in_progress"}}),
                           self.event("response.function_call_arguments.delta",
                                      {"item_id": item["id"], "output_index": index, "delta": item["arguments"]}),
                           self.event("response.function_call_arguments.done",
                                      {"item_id": item["id"], "output_index": index, "name": item["name"],
                                       "arguments": item["arguments"]})]
            frames.append(self.event("response.output_item.done", {"output_index": index, "item": item}))
        name = "response.completed" if body["status"] == "completed" else "response.incomplete"
        frames.append(self.event(name, {"response": body}))
        return frames


# -- retrieve, delete --------------------------------------------------------------------------

ROW_STATUS = {MessageStatus.PENDING: "in_progress", MessageStatus.STREAMING: "in_progress",
              MessageStatus.CANCELLED: "cancelled", MessageStatus.FAILED: "failed",
              MessageStatus.INTERRUPTED: "failed", MessageStatus.REFUSED: "failed"}


def stored_body(row: dict[str, Any]) -> dict[str, Any]:
    """A stored reply's row as a response object."""
    shape = Shape(id=row["id"], created_at=int(row["created_at"].timestamp()), model=row["model"] or "",
                  echo={"store": True})
    status, incomplete = ROW_STATUS.get(row["status"], "completed"), None
    if row["status"] == MessageStatus.COMPLETE:
        status, incomplete = outcome(row["metadata"].get("finish_reason", "stop"))
    item_status = {"completed": "completed", "in_progress": "in_progress"}.get(status, "incomplete")
    calls = row["metadata"].get("tool_calls") or []
    # as the reply was answered (_finished): a message when it said something, or called nothing
    output = ([shape.message(row["content"], item_status)]
              if row["content"] or (status == "completed" and not calls) else [])
    output.extend(shape.function_calls(calls))
    output.extend(shape.reasoning(reasoning_blocks(row["metadata"].get("reasoning", ()))))
    usage = None
    if row["prompt_tokens"] is not None:
        meta = row["metadata"]
        usage = UsageReport(row["prompt_tokens"], row["completion_tokens"] or 0,
                            cached_tokens=meta.get("cached_tokens", 0),
                            cache_write_tokens=meta.get("cache_write_tokens", 0))
    error = None
    if row["error"] is not None:
        error = {"code": "server_error", "message": str(row["error"].get("message", ""))}
    body = shape.body(status, output, usage, error=error, incomplete=incomplete)
    if row["finished_at"] is not None and status == "completed":
        body["completed_at"] = int(row["finished_at"].timestamp())
    return body


def reasoning_blocks(events: Iterable[list[Any]]) -> list[dict[str, str]]:
    """A stored reply's reasoning events ([seq, text] or [seq, text, signature]) as blocks of
    {"text", "signature"}, a signature closing its block."""
    blocks: list[dict[str, str]] = []
    for event in events:
        if not blocks or blocks[-1]["signature"]:
            blocks.append({"text": "", "signature": ""})
        blocks[-1]["text"] += event[1]
        if len(event) > 2:
            blocks[-1]["signature"] = event[2]
    return blocks


_QUERY_INT = re.compile(r"-?(0|[1-9][0-9]{0,9})", re.ASCII)


def _query_flag(request: web.Request, name: str) -> bool:
    raw = request.query.get(name, "false")
    if raw not in ("true", "false", "1", "0"):
        raise OpenAIError(400, f"'{name}' must be true or false", param=name)
    return raw in ("true", "1")


def _query_int(request: web.Request, name: str, low: int, high: int, default: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    if _QUERY_INT.fullmatch(raw) is None or not low <= int(raw) <= high:
        raise OpenAIError(400, f"'{name}' must be an integer from {low} to {high}", param=name)
    return int(raw)


@operation("A stored response, rebuilt from its reply; with stream=true its semantic events", "openai",
           {"200": response("The response; with `stream=true` its semantic events, replayed (or followed live) "
                            "after `starting_after`", RESPONSE_ANSWER),
            **errors(400, 401, 403, 404, openai=True), **errors(503)},
           parameters=[RESPONSE_ID, query("stream", {"enum": ["true", "false", "1", "0"]}, "Stream the events"),
                       query("starting_after", {"type": "integer", "minimum": -1, "maximum": STARTING_AFTER_MAX},
                             "Resume after this sequence_number")])
@openai_errors
async def get_response(request: web.Request) -> web.StreamResponse:
    """A stored response; with `?stream=true` its semantic events, replayed from the stored reply (or
    followed live while it generates), after `starting_after` (a sequence_number) when given."""
    principal = await caller(request, "chat")
    raw = request.match_info["response_id"]
    stream = _query_flag(request, "stream")
    after = _query_int(request, "starting_after", -1, STARTING_AFTER_MAX, -1)
    message_id = parse_response_id(raw)
    row = await _reply_row(request, principal, message_id, raw)
    if not stream:
        return json_response(stored_body(row))
    reply = await request.app[TURNS].reply(principal.user_id, message_id)
    shape = Shape(id=message_id, created_at=int(row["created_at"].timestamp()), model=row["model"] or "",
                  echo={"store": True})
    source = _ReplyEvents(reply)
    try:
        return await _respond(request, shape, source.batches(), True, _Reply(), lambda: source.model,
                              starting_after=after)
    except ProviderError:
        # failed before any output: the stream is its creation and its failure, as it went live
        return await _failed_stream(request, shape, stored_body(await _reply_row(request, principal, message_id,
                                                                                 raw)), after)


async def _failed_stream(request: web.Request, shape: Shape, body: dict[str, Any],
                         after: int) -> web.StreamResponse:
    out = _Frames(shape, after)
    frames = [out.lifecycle("response.created", "in_progress"), out.lifecycle("response.in_progress", "in_progress"),
              out.event("response.failed", {"response": body})]
    resp = sse_stream()
    await resp.prepare(request)
    await resp.write(b"".join(frames))
    await resp.write_eof()
    return resp


def input_items(message: dict[str, Any]) -> list[dict[str, Any]]:
    """A stored user message as the input items it was: a message (`msg_<hex>` of the user message's
    id; content parts sent to POST /api/chat become input_text and input_image parts), or a stored
    tool round's items, named by their place in it (`msg_`, `fc_`, `fco_<hex>_<index>`)."""
    hexid = message["id"].hex
    stored = (message["metadata"] or {}).get("messages")
    if stored is None:
        return [_message_item("msg_" + hexid, message["content"] if message["parts"] is None else message["parts"])]
    items: list[dict[str, Any]] = []
    for i, m in enumerate(stored):
        if m["role"] == "tool":
            items.append({"id": f"fco_{hexid}_{i}", "type": "function_call_output", "status": "completed",
                          "call_id": m["tool_call_id"], "output": text_of(m["content"])})
        elif m.get("tool_calls"):
            items.extend({"id": f"fc_{hexid}_{i}_{j}", "type": "function_call", "status": "completed",
                          "call_id": call["id"], "name": call["function"]["name"],
                          "arguments": call["function"]["arguments"]} for j, call in enumerate(m["tool_calls"]))
        else:
            items.append(_message_item(f"msg_{hexid}_{i}", m["content"]))
    return items


def _message_item(item_id: str, content: str | list[dict[str, Any]]) -> dict[str, Any]:
    parts = [{"type": "input_text", "text": content}] if isinstance(content, str) else [
        {"type": "input_text", "text": p["text"]} if p["type"] == "text" else
        {"type": "input_image", "image_url": p["image_url"]["url"], "detail": p["image_url"].get("detail", "auto")}
        for p in content]
    return {"id": item_id, "type": "message", "role": "user", "status": "completed", "content": parts}


@operation("A stored response's input items (its user message, or its tool round; other items were for the turn "
           "only)", "openai",
           {**ok(200, "A cursor page of input items", contract.ResponseItemList),
            **errors(400, 401, 403, 404, openai=True), **errors(503)},
           parameters=[RESPONSE_ID,
                       query("limit", {"type": "integer", "minimum": 1, "maximum": 100, "default": 20}, "Page size"),
                       query("order", {"enum": ["asc", "desc"], "default": "desc"}, "Order"),
                       query("after", {"type": "string"}, "List the items after this item id")])
@openai_errors
async def list_input_items(request: web.Request) -> web.Response:
    """`GET /v1/responses/{id}/input_items`: what the response answered, as OpenAI's cursor page
    (`limit` 1..100, default 20; `order` desc by default, as OpenAI; `after` an item id). A stored
    turn keeps its prompt (its user message, or its tool round): the other input items and
    `instructions` were for that turn only."""
    principal = await caller(request, "chat")
    raw = request.match_info["response_id"]
    limit = _query_int(request, "limit", 1, 100, 20)
    order = request.query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise OpenAIError(400, "'order' must be asc or desc", param="order")
    row = await _reply_row(request, principal, parse_response_id(raw), raw)
    user_message = await message_store.get_message(request.app[DB].pool, principal.user_id, row["reply_to"])
    items = input_items(user_message)
    if order == "desc":
        items.reverse()
    after = request.query.get("after")
    if after is not None:
        ids = [item["id"] for item in items]
        items = items[ids.index(after) + 1:] if after in ids else []
    page = items[:limit]
    return json_response({"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                          "last_id": page[-1]["id"] if page else None, "has_more": len(items) > limit})


@operation("Delete a stored response's turn (and its thread when nothing else is left; usage is kept)", "openai",
           {**ok(200, "Deleted", contract.ResponseDeleted), **errors(401, 403, 404, openai=True), **errors(503)},
           parameters=[RESPONSE_ID])
@openai_errors
async def delete_response(request: web.Request) -> web.Response:
    principal = await caller(request, "chat")
    raw = request.match_info["response_id"]
    message_id = parse_response_id(raw)
    try:
        await request.app[TURNS].delete_turn(principal.user_id, message_id)
    except NotFound:
        raise _not_found(raw, None) from None
    return json_response({"id": raw, "object": "response.deleted", "deleted": True})
