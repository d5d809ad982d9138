"""The HTTP contract: request and response bodies as typed structs (the request bodies decoded by the
handlers through them; GET /openapi.json's schemas generated from both), each handler's operation,
and the document built from the route table.

    anthropic.py POST /v1/messages' and /v1/messages/count_tokens' bodies; the door's answers (message, count, error)
    decoding.py  a body through a struct; msgspec's error as the field it is about, for each door's shape
    native.py    the native API's bodies (chat turn, arena, regenerate, thread, vote) and content parts
    openai.py    POST /v1/chat/completions' body; the OpenAI door's answers (completion, models, embeddings, error)
    operations.py  each handler's operation (summary, tag, body, parameters, answers, auth), declared by the handler
    openapi.py   GET /openapi.json: its paths built from the route table and the operations
    replies.py   the native API's answers (message, thread, comparison, keys, me, usage, error, SSE event data)
    responses.py POST /v1/responses' body (its items and tools as schemas); the response object, item page, deletion
"""

__all__ = [
    "anthropic",
    "decoding",
    "native",
    "openai",
    "openapi",
    "operations",
    "replies",
    "responses",
]
