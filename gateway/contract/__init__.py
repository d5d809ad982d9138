"""The HTTP contract.

    openapi.py  GET /openapi.json
"""

__all__ = [
    "openapi",
]
