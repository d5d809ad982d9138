"""Tests of gateway/contract/ (tests/ mirrors the package; shared helpers live in tests/support/)."""
