"""Tests of gateway/observability/ (tests/ mirrors the package; shared helpers live in tests/support/)."""
