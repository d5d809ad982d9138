"""`serve --workers N`: whichever worker answers a scrape answers for all of them.

Each worker keeps its own registry (metrics.py) and also serves it, unsummed, on a Unix socket of
its own in a folder the parent made for them (`GATEWAY_WORKERS_DIR`, one `worker-<i>.sock` each).
The worker a scrape lands on reads its siblings' sockets and adds every series up: counters and
histograms are the fleet's totals, so consecutive scrapes never go backwards the way answers from
one worker at random did. Levels are summed too (live generations, pool connections, queue depths;
a circuit state's series counts the workers that see the model in that state).

A sibling that does not answer (restarting) is left out of that scrape; its counters start again
from zero when it is back, which Prometheus reads as one worker's reset, as with one process.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

WORKERS_DIR_ENV = "GATEWAY_WORKERS_DIR"  # set by the parent of `serve --workers N`, with GATEWAY_WORKER
SCRAPE_TIMEOUT_S = 2.0
OWN_PATH = "/worker-metrics"


class Siblings:
    """This worker's socket and the folder every worker's socket is in."""

    def __init__(self, folder: Path, index: int) -> None:
        self.folder = folder
        self.own = folder / f"worker-{index}.sock"

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Siblings | None:
        """The workers' folder and this worker's index when the parent set them, else None (one process)."""
        folder, index = env.get(WORKERS_DIR_ENV), env.get("GATEWAY_WORKER")
        if not folder or index is None:
            return None
        return cls(Path(folder), int(index))

    @asynccontextmanager
    async def serving(self, registry: CollectorRegistry) -> AsyncIterator[None]:
        """This worker's own series on its socket, for its siblings' scrapes, while the block runs."""

        async def own(_: web.Request) -> web.Response:
            return web.Response(body=generate_latest(registry), content_type="text/plain")

        side = web.Application()
        side.router.add_get(OWN_PATH, own)
        runner = web.AppRunner(side, access_log=None)
        await runner.setup()
        try:
            await web.UnixSite(runner, str(self.own)).start()  # a stale socket of a dead worker is replaced
            yield
        finally:
            await runner.cleanup()

    async def exposition(self, registry: CollectorRegistry) -> bytes:
        """Every worker's series summed, in the Prometheus text format."""
        others = [p for p in self.folder.glob("worker-*.sock") if p != self.own]
        texts = await asyncio.gather(*(read_socket(p) for p in others))
        return combine([generate_latest(registry).decode(), *(t for t in texts if t is not None)])


async def read_socket(path: Path) -> str | None:
    try:
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(path)),
                                         timeout=aiohttp.ClientTimeout(total=SCRAPE_TIMEOUT_S)) as session, \
                session.get("http://worker" + OWN_PATH) as resp:
            return await resp.text() if resp.status == 200 else None
    except (aiohttp.ClientError, OSError, TimeoutError):
        return None  # a worker restarting, or gone: its socket file outlives it


def combine(texts: list[str]) -> bytes:
    """Sum the same series across expositions; `_created` (a start time) keeps the earliest."""
    families: dict[str, Metric] = {}
    values: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            families.setdefault(family.name, Metric(family.name, family.documentation, family.type, family.unit))
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if key not in values:
                    families[family.name].samples.append(sample)
                    values[key] = sample.value
                elif sample.name.endswith("_created"):
                    values[key] = min(values[key], sample.value)
                else:
                    values[key] += sample.value
    for family in families.values():
        family.samples = [s._replace(value=values[(s.name, tuple(sorted(s.labels.items())))])
                          for s in family.samples]
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(lambda: iter(families.values())))
    return generate_latest(registry)


class _Fixed(Collector):
    def __init__(self, read: Callable[[], Iterator[Metric]]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        return self._read()


def workers_dir_env(folder: Path) -> dict[str, str]:
    """What the parent adds to each worker's environment."""
    return {WORKERS_DIR_ENV: os.fspath(folder)}
