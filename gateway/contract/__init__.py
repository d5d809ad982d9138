"""The HTTP contract.

    native.py   the native API's request bodies as typed structs: decoded by the handlers, and the schemas
    openapi.py  GET /openapi.json
"""

__all__ = [
    "native",
    "openapi",
]
