"""The gateway's own HTTP surface under /api (and /, /docs, /healthz, /readyz, /metrics, /ws).

    chat.py        POST /api/chat and the message endpoints (stream, cancel, regenerate)
    threads.py     threads: create, list, read, delete
    arena.py       two models side by side, the vote, the leaderboard
    ws.py          WebSocket chat: the same turns and events as JSON frames
    keys.py        API keys: create, list, revoke
    account.py     /api/me and the caller's usage
    admin.py       the operator's API: model health, the audit trail, configuration reload
    erasure.py     DELETE /api/admin/users/{id}: erase a user and everything that names them
    bodies.py      the request bodies shared by chat, arena and WebSocket
    playground.py  the HTML playground at /
    docs.py        Swagger UI at /docs
    ops.py         liveness, readiness, metrics
"""

__all__ = [
    "account",
    "admin",
    "arena",
    "bodies",
    "chat",
    "docs",
    "erasure",
    "keys",
    "ops",
    "playground",
    "threads",
    "ws",
]
