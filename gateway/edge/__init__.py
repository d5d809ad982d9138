"""The edge: what every request passes before a handler, and how bytes leave.

    lean.py           the connection: the static routes served without aiohttp's handler
    middleware.py     request ids, errors as JSON, CORS, the access log
    auth.py           who is calling: API keys and JWTs, behind in-process caches
    jwt_auth.py       verifying Supabase-style access tokens (HS* or a JWKS)
    stream_tokens.py  short-lived tokens for a `stream_url` (EventSource sends no header)
    activity.py       the activity log's row per authenticated request
    malformed.py      malformed HTTP requests answered with our JSON error
    held.py           what a held stream keeps of aiohttp's per-request state
    sse.py            the native SSE wire protocol, as pre-encoded bytes

Imports the layers below it (service, policy, generation, store, observability), never a door.
"""

__all__ = [
    "activity",
    "auth",
    "held",
    "jwt_auth",
    "lean",
    "malformed",
    "middleware",
    "sse",
    "stream_tokens",
]
