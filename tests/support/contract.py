"""The operations the OpenAPI document describes."""

from __future__ import annotations

from typing import Any


def documented_operations(document: dict[str, Any]) -> set[str]:
    methods = {"get", "post", "put", "patch", "delete"}
    return {f"{m.upper()} {path}" for path, item in document["paths"].items() for m in item if m in methods}
