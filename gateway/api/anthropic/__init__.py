"""The Anthropic-compatible front door: what the official Anthropic SDK speaks.

    messages.py  POST /v1/messages and /v1/messages/count_tokens
"""

__all__ = [
    "messages",
]
