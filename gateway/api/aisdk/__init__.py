"""The Vercel AI SDK's door: `useChat` with `DefaultChatTransport` talks to the gateway as to its own
route, in the AI SDK's UI message stream protocol (docs/ai-sdk.md).

    chat.py      POST /api/ai-sdk/chat and the chat's stream, messages and stop routes
    bodies.py    the body DefaultChatTransport posts, checked before anything is written
    stream.py    a reply's native events as UI message stream chunks
    history.py   a chat's thread as UIMessage[]
"""

__all__ = [
    "bodies",
    "chat",
    "history",
    "stream",
]
