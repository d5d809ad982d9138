"""The access line's own cost: microseconds of CPU per request for `AccessLogger.log`, in the text
and JSON formats, with logging set up as `python -m gateway` sets it up (INFO, the root handler on
a stream) but writing to /dev/null, so the figure is the gateway's work and not the terminal's.

    .venv/bin/python bench/access_log.py            # 20,000 lines per format, median of 5 rounds
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import sys
import time
import uuid

from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from gateway.edge.middleware import AccessLogger
from gateway.observability.logs import configure_logging
from gateway.observability.metrics import Timings
from gateway.state import REQUEST_ID, TIMINGS, USER_ID


class Transport:
    """An open connection, as the access logger sees one (a mock's attribute lookups would cost
    more than the line itself)."""

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("127.0.0.1", 50000) if name == "peername" else default


async def _handler(request: web.Request) -> web.StreamResponse:
    raise AssertionError("never called")


ROUTER = web.UrlDispatcher()
ROUTER.add_post("/api/chat", _handler)


def one_request() -> tuple[web.Request, web.StreamResponse]:
    request = make_mocked_request("POST", "/api/chat?stream=true", headers={"Authorization": "Bearer gwk_x"},
                                  transport=Transport())
    request._match_info = asyncio.run(ROUTER.resolve(request))  # a real route, as the server's requests have
    request[REQUEST_ID] = uuid.uuid4().hex
    request[USER_ID] = str(uuid.uuid4())
    timings = Timings()
    timings.phases.update(auth=0.21, persist=1.37, first_token=2.05)
    request[TIMINGS] = timings
    return request, web.StreamResponse(status=200)


def per_line_us(logger: AccessLogger, lines: int) -> float:
    """Inside an event loop, as the server calls it; the buffered lines' writes included."""
    pairs = [one_request() for _ in range(lines)]

    async def run() -> float:
        start = time.process_time()
        for request, response in pairs:
            logger.log(request, response, 0.003)
        for handler in logging.root.handlers:
            handler.flush()
        return (time.process_time() - start) / lines * 1e6

    return asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    devnull = open(os.devnull, "w")  # noqa: SIM115 - for the whole run
    results = {}
    for fmt in ("text", "json"):
        logging.root.handlers.clear()
        sys.stderr, saved = devnull, sys.stderr
        try:
            configure_logging("INFO", fmt)
        finally:
            sys.stderr = saved
        logger = AccessLogger(logging.getLogger("aiohttp.access"), "")
        per_line_us(logger, 1000)  # warm-up
        results[fmt] = statistics.median(per_line_us(logger, args.lines) for _ in range(args.rounds))
    for fmt, us in results.items():
        print(f"{fmt}: {us:.1f} µs per access line")


if __name__ == "__main__":
    main()
