"""Tests of gateway/fleet/ (tests/ mirrors the package; shared helpers live in tests/support/)."""
