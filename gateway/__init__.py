"""A streaming chat gateway: persist, decide, execute, respond."""

__version__ = "0.1.0"
