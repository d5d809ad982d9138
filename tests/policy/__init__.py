"""Tests of gateway/policy/ (tests/ mirrors the package; shared helpers live in tests/support/)."""
