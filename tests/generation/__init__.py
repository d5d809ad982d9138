"""Tests of gateway/generation/ (tests/ mirrors the package; shared helpers live in tests/support/)."""
