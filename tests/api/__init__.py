"""Tests of gateway/api/ (tests/ mirrors the package; shared helpers live in tests/support/)."""
