"""Tests of gateway/api/openai/ (tests/ mirrors the package; shared helpers live in tests/support/)."""
