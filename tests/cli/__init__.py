"""Tests of gateway/cli/ (tests/ mirrors the package; shared helpers live in tests/support/)."""
