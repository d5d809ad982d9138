"""The HTTP contract: request bodies as typed structs (decoded by the handlers, and the schemas of
GET /openapi.json), and the document.

    anthropic.py POST /v1/messages' and /v1/messages/count_tokens' bodies
    decoding.py  a body through a struct; msgspec's error as the field it is about, for each door's shape
    native.py    the native API's bodies (chat turn, arena, regenerate, thread, vote) and content parts
    openai.py    POST /v1/chat/completions' body
    openapi.py   GET /openapi.json
    responses.py POST /v1/responses' body
"""

__all__ = [
    "anthropic",
    "decoding",
    "native",
    "openai",
    "openapi",
    "responses",
]
