"""What every front door accepts alike: message content as text or OpenAI-style parts (text,
image_url), and the bound on a reply's tokens. Defined once, in the contract
(gateway/contract/native.py), where the parts' structs also make GET /openapi.json's schemas."""

from __future__ import annotations

from gateway.contract.native import IMAGE_DETAILS, MAX_PARTS, MAX_TOKENS_LIMIT, parse_content

__all__ = ["IMAGE_DETAILS", "MAX_PARTS", "MAX_TOKENS_LIMIT", "parse_content"]
