"""Tests of gateway/webhooks/ (tests/ mirrors the package; shared helpers live in tests/support/)."""
