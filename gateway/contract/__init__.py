"""The HTTP contract: request bodies as typed structs (decoded by the handlers, and the schemas of
GET /openapi.json), and the document.

    decoding.py  a body through a struct; msgspec's error as the field it is about, for each door's shape
    native.py    the native API's bodies (chat turn, arena, regenerate, thread, vote) and content parts
    openai.py    POST /v1/chat/completions' body
    operations.py  each handler's operation (summary, tag, body, parameters, answers, auth), declared by the handler
    openapi.py   GET /openapi.json: its paths built from the route table and the operations
"""

__all__ = [
    "decoding",
    "native",
    "openai",
    "openapi",
    "operations",
]
