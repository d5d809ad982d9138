"""Tests of gateway/edge/ (tests/ mirrors the package; shared helpers live in tests/support/)."""
