"""The body `DefaultChatTransport` posts, checked before anything is written.

    {"id": chat id, "messages": UIMessage[], "trigger": "submit-message" | "regenerate-message",
     "messageId"?: the message to regenerate, "model"?: a model name or "auto", ...}

The gateway keeps the conversation (the chat's thread): of `messages` only the last one is the
turn, and it must be the user's. Its `id` is the turn's idempotency key. Every message's parts
must be of a type the AI SDK defines; extra body fields other than `model` are ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gateway.api.content import parse_content
from gateway.contract.native import MAX_CLIENT_MESSAGE_ID, check_text
from gateway.errors import BadRequest
from gateway.service.router import AUTO

MAX_CHAT_ID = 200

TRIGGERS = ("submit-message", "regenerate-message")
ROLES = ("system", "user", "assistant")
# the UIMessage part types of the `ai` package (its uiMessagesSchema); `tool-*` and `data-*` by prefix
PART_TYPES = frozenset({"text", "reasoning", "custom", "source-url", "source-document", "file", "reasoning-file",
                        "steering-message", "step-start", "dynamic-tool"})
PART_PREFIXES = ("tool-", "data-")


@dataclass(frozen=True, slots=True, kw_only=True)
class ChatTurn:
    chat_id: str
    message_id: str  # the last user message's id: the idempotency key
    content: str  # its text
    parts: list[dict[str, Any]] | None  # with images: OpenAI-style content parts, as the native turn takes
    regenerate: bool
    regenerated_id: str | None  # `messageId`: the reply being replaced, when regenerating
    model: str | None


def check_chat_id(raw: Any, what: str = "id") -> str:
    if not isinstance(raw, str) or not 1 <= len(raw) <= MAX_CHAT_ID:
        raise BadRequest(f"{what} must be a chat id of 1 to {MAX_CHAT_ID} characters")
    return check_text(raw, what)


def parse_chat(body: dict[str, Any], known_model: Any) -> ChatTurn:
    chat_id = check_chat_id(body.get("id"))
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list of UI messages")
    for i, message in enumerate(messages):
        _check_message(message, f"messages[{i}]")
    last = messages[-1]
    where = f"messages[{len(messages) - 1}]"
    if last["role"] != "user":
        raise BadRequest(f"{where}.role must be user: the last message is the turn")
    if not 1 <= len(last["id"]) <= MAX_CLIENT_MESSAGE_ID:
        raise BadRequest(f"{where}.id must be 1 to {MAX_CLIENT_MESSAGE_ID} characters")
    content, parts = _user_content(last["parts"], where)
    trigger = body.get("trigger", "submit-message")
    if trigger not in TRIGGERS:
        raise BadRequest("trigger must be submit-message or regenerate-message")
    regenerated = body.get("messageId")
    if regenerated is not None and not isinstance(regenerated, str):
        raise BadRequest("messageId must be a string")
    model = body.get("model")
    if model is not None:
        if not isinstance(model, str):
            raise BadRequest("model must be a model name")
        if model != AUTO and not known_model(model):
            raise BadRequest(f"unknown model {model!r}")
    return ChatTurn(chat_id=chat_id, message_id=check_text(last["id"], f"{where}.id"), content=content,
                    parts=parts, regenerate=trigger == "regenerate-message",
                    regenerated_id=regenerated if trigger == "regenerate-message" else None, model=model)


def _check_message(message: Any, where: str) -> None:
    if not isinstance(message, dict):
        raise BadRequest(f"{where} must be a UI message object")
    if not isinstance(message.get("id"), str):
        raise BadRequest(f"{where}.id must be a string")
    if message.get("role") not in ROLES:
        raise BadRequest(f"{where}.role must be system, user or assistant")
    parts = message.get("parts")
    if not isinstance(parts, list):
        raise BadRequest(f"{where}.parts must be a list")
    for j, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if not isinstance(kind, str) or not (kind in PART_TYPES or kind.startswith(PART_PREFIXES)):
            raise BadRequest(f"{where}.parts[{j}].type must be a UI message part type (text, file, reasoning, "
                             "tool-*, data-*, ...)")


def _user_content(parts: list[dict[str, Any]], where: str) -> tuple[str, list[dict[str, Any]] | None]:
    """The turn's text, and its OpenAI-style parts when it has images (other parts say nothing to a model:
    step markers, data parts)."""
    content: list[dict[str, Any]] = []
    for j, part in enumerate(parts):
        at = f"{where}.parts[{j}]"
        if part["type"] == "text":
            if not isinstance(part.get("text"), str):
                raise BadRequest(f"{at}.text must be a string")
            content.append({"type": "text", "text": part["text"]})
        elif part["type"] == "file":
            url, media_type = part.get("url"), part.get("mediaType")
            if not isinstance(url, str) or not isinstance(media_type, str) or not media_type.startswith("image/"):
                raise BadRequest(f"{at} must be an image: mediaType image/... and a url")
            content.append({"type": "image_url", "image_url": {"url": url}})
    if not content:
        raise BadRequest(f"{where}.parts must have a text or an image part")
    try:
        if all(p["type"] == "text" for p in content):
            return parse_content(" ".join(p["text"] for p in content if p["text"]))
        return parse_content(content)
    except BadRequest as e:
        raise BadRequest(f"{where}.parts: {e.message}") from None
