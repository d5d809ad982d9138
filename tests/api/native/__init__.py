"""Tests of gateway/api/native/ (tests/ mirrors the package; shared helpers live in tests/support/)."""
