"""Tests of gateway/store/ (tests/ mirrors the package; shared helpers live in tests/support/)."""
