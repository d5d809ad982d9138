"""What a held stream keeps of aiohttp's per-request state.

A relayed stream can stay open for minutes while nothing moves, and thousands are held at once:
whatever its request, response and connection keep for its whole life is multiplied by them.
`hold_open(request, response)`, called once a stream's response is prepared, lets go of what
nothing reads any more:

- the response's headers (a multidict, ~1 KB with its strings): they went out with prepare();
  only the status is read afterwards (access log, metrics);
- the connection's idle timer, armed when it was accepted: it cannot fire while a request is
  being answered, and aiohttp arms it again when the response ends (`keep_alive()`, public);
- two empty queues with a 0.7 KB first block each (a `deque` always allocates one): the
  connection's queue of pipelined requests and the request body's buffer, read to its end by
  then. Each becomes a `_Queue`, a list with the two deque methods aiohttp calls on it. These
  are aiohttp's private attributes (gateway/compat.py, where tests/test_compat.py pins them):
  each is replaced only while it is exactly an empty deque, so an aiohttp that changes them
  costs memory again, never correctness.
"""

from __future__ import annotations

from aiohttp import web

from gateway.compat import lighten_request_queues


def hold_open(request: web.Request, response: web.StreamResponse) -> None:
    """Call once a response that stays open (a stream) is prepared (see the module docstring)."""
    assert response.prepared, "hold_open() after prepare(): the headers must have gone out"
    response.headers.clear()
    protocol = request.protocol
    if protocol is not None:
        protocol.keep_alive(True)  # cancels the idle timer; the response's end sets the mode again
    lighten_request_queues(request)
