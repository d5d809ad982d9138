"""The front doors: one package per wire protocol, each with its own bodies and error shape.

    native/     /api/*: chat, threads, arena, WebSocket, keys, account, playground, docs, ops
    openai/     /v1/chat/completions, /v1/responses, /v1/embeddings, /v1/models
    anthropic/  /v1/messages
    aisdk/      /api/ai-sdk/chat: the Vercel AI SDK's UI message stream (useChat)
    common.py   what every handler shares: JSON in and out, ids, the caller
    content.py  message content every door accepts (text, image parts), the token bound

A handler parses, calls the service layer, and responds; no door imports another.
"""

__all__ = [
    "aisdk",
    "anthropic",
    "common",
    "content",
    "native",
    "openai",
]
