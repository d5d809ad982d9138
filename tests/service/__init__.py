"""Tests of gateway/service/ (tests/ mirrors the package; shared helpers live in tests/support/)."""
