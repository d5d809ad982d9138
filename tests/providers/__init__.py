"""Tests of gateway/providers/ (tests/ mirrors the package; shared helpers live in tests/support/)."""
