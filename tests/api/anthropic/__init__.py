"""Tests of gateway/api/anthropic/ (tests/ mirrors the package; shared helpers live in tests/support/)."""
