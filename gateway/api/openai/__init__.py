"""The OpenAI-compatible front door: what the official OpenAI SDKs speak.

    chat_completions.py  POST /v1/chat/completions, GET /v1/models
    responses.py         the Responses API: POST, GET and DELETE /v1/responses
    embeddings.py        POST /v1/embeddings
    ratelimits.py        OpenAI's x-ratelimit-* headers
"""

__all__ = [
    "chat_completions",
    "embeddings",
    "ratelimits",
    "responses",
]
