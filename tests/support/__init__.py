"""Helpers and fixtures the test modules share (no test module imports another).

fakes: scripted upstream providers; gemini: a fake Gemini upstream that checks what it receives;
conformance: the conformance matrix's upstreams, replies and one driver per front door;
hostile: upstreams that misbehave on the wire; fleet: gateway
subprocesses, a private redis-server, nginx; properties: the seeded interleavings of the property
test; common: users, clients, polling; the rest hold what groups of test modules share (chat, arena,
providers, auth, browser, ...)."""
