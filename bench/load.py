"""Load driver for one streaming target (loopback only); prints ONE JSON line.

    --target direct  POST <url>/v1/chat/completions on the fake upstream (OpenAI format)
    --target openai  POST <url>/v1/chat/completions on the gateway (OpenAI format, API key)
    --target native  POST <url>/api/chat on the gateway: {"content": ..., "stream": true}

C workers send N streaming requests in total (hard stop at --duration s) after --warmup
unmeasured ones. Per request:
  TTFT   from the start of the POST (pool wait included) to the read that completes the
         first content event: a non-empty `delta.content` (OpenAI) or a `{"delta":` event (native)
  total  until the body ends
  ok     HTTP 200, >= 1 content event, `data: [DONE]` seen, no error event
Requests still in flight at --duration are `cut` (neither ok nor failed); req/s is ok
requests over the time from the start to the last ok completion.

--pid LABEL=PID (repeatable) samples that process tree from /proc: CPU time over the
measured window (cores busy, CPU ms per ok request) and RSS (start, peak, end).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import sys
import time
from urllib.parse import urlsplit

import aiohttp

PATHS = {"direct": "/v1/chat/completions", "openai": "/v1/chat/completions", "native": "/api/chat"}
# one regex per wire format, run over each block of complete events (cheap, no JSON parsing)
CONTENT = {"direct": re.compile(rb'"content":\s*"[^"]'), "openai": re.compile(rb'"content":\s*"[^"]'),
           "native": re.compile(rb'^data: \{"delta":', re.M)}
ERROR = {"direct": re.compile(rb'"error":\s*[{"]'), "openai": re.compile(rb'"error":\s*[{"]'),
         "native": re.compile(rb"^event: error$", re.M)}
DONE = re.compile(rb"^data: \[DONE\]$", re.M)
TICK = os.sysconf("SC_CLK_TCK")


class Rec:
    __slots__ = ("status", "ttft", "total", "t_end", "chunks", "done", "error")

    def __init__(self) -> None:
        self.status = self.chunks = 0
        self.ttft = self.total = self.t_end = None
        self.done = False
        self.error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.done and self.chunks > 0 and self.error is None


async def one(session: aiohttp.ClientSession, url: str, body: bytes, headers: dict, target: str, rec: Rec,
              timeout: aiohttp.ClientTimeout) -> None:
    content_re, error_re = CONTENT[target], ERROR[target]
    t0 = time.perf_counter()
    try:
        async with session.post(url, data=body, headers=headers, timeout=timeout) as resp:
            rec.status = resp.status
            if resp.status != 200:
                rec.error = f"http_{resp.status}"
                await resp.read()
                return
            buf = b""
            async for data in resp.content.iter_any():
                buf += data
                cut = buf.rfind(b"\n\n")
                if cut < 0:
                    continue
                part, buf = buf[:cut + 2], buf[cut + 2:]
                n = len(content_re.findall(part))
                if n:
                    if not rec.chunks:
                        rec.ttft = time.perf_counter() - t0
                    rec.chunks += n
                if error_re.search(part) and rec.error is None:
                    rec.error = "stream_error"
                if DONE.search(part):
                    rec.done = True
            rec.t_end = time.perf_counter()
            rec.total = rec.t_end - t0
            if not rec.done and rec.error is None:
                rec.error = "no_done"
    except TimeoutError:
        rec.error = "timeout"
    except (aiohttp.ClientError, OSError) as e:
        rec.error = type(e).__name__


def pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, round(p / 100 * (len(values) - 1)))]


def ms(v: float | None) -> float | None:
    return None if v is None else round(v * 1000, 3)


def proc_tree(pid: int) -> tuple[int, int]:
    """(VmRSS kB, utime+stime ticks) of pid and all its descendants."""
    rss = ticks = 0
    todo, seen = [pid], 0
    while todo and seen < 512:
        p = todo.pop()
        seen += 1
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])
            with open(f"/proc/{p}/status") as f:
                rss += next((int(line.split()[1]) for line in f if line.startswith("VmRSS:")), 0)
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except (OSError, ValueError, IndexError):
            pass  # the process (or a child) exited meanwhile
    return rss, ticks


class Sampler:
    """CPU over the measured window and RSS (start/peak/end) of one process tree."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.rss_start = self.rss_peak = self.rss_end = 0
        self.t0 = self.t1 = (0.0, 0)

    def sample(self) -> int:
        kb, ticks = proc_tree(self.pid)
        self.rss_start = self.rss_start or kb
        self.rss_peak, self.rss_end = max(self.rss_peak, kb), kb
        return ticks

    def mark(self) -> None:
        self.t0 = (time.perf_counter(), self.sample())

    def stop(self) -> None:
        self.t1 = (time.perf_counter(), self.sample())

    def report(self, n_ok: int) -> dict:
        cpu = (self.t1[1] - self.t0[1]) / TICK
        return {"pid": self.pid, "cpu_s": round(cpu, 2),
                "cpu_util": round(cpu / max(self.t1[0] - self.t0[0], 1e-9), 3),
                "cpu_ms_per_req": round(cpu * 1000 / n_ok, 3) if n_ok else None,
                "rss_start_mb": round(self.rss_start / 1024, 1), "rss_peak_mb": round(self.rss_peak / 1024, 1),
                "rss_end_mb": round(self.rss_end / 1024, 1)}


def request_body(a: argparse.Namespace) -> bytes:
    if a.target == "native":
        return json.dumps({"content": a.prompt, "stream": True}).encode()
    return json.dumps({"model": a.model, "stream": True, "stream_options": {"include_usage": True},
                       "messages": [{"role": "user", "content": a.prompt}]}).encode()


async def run(a: argparse.Namespace) -> dict:
    url = a.url.rstrip("/") + PATHS[a.target]
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
    if a.api_key:
        headers["Authorization"] = "Bearer " + a.api_key
    body = request_body(a)
    timeout = aiohttp.ClientTimeout(total=a.timeout)
    samplers = {label: Sampler(int(pid)) for label, _, pid in (s.rpartition("=") for s in a.pid)}

    async def sample_peaks() -> None:
        while True:
            for s in samplers.values():
                s.sample()
            await asyncio.sleep(0.25)

    conn = aiohttp.TCPConnector(limit=a.concurrency, ttl_dns_cache=None)
    async with aiohttp.ClientSession(connector=conn, auto_decompress=False) as session:
        warm = iter(range(a.warmup))

        async def warm_worker() -> None:
            for _ in warm:
                await one(session, url, body, headers, a.target, Rec(), timeout)

        await asyncio.wait_for(asyncio.gather(*(warm_worker() for _ in range(min(a.concurrency, a.warmup)))),
                               timeout=a.timeout + a.duration)
        for s in samplers.values():
            s.mark()
        peaks = asyncio.ensure_future(sample_peaks())
        recs: list[Rec] = []
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        t_start = time.perf_counter()
        deadline = t_start + a.duration

        async def worker() -> None:
            while len(recs) < a.requests and time.perf_counter() < deadline:
                rec = Rec()
                recs.append(rec)
                await one(session, url, body, headers, a.target, rec, timeout)

        tasks = [asyncio.ensure_future(worker()) for _ in range(a.concurrency)]
        _, pending = await asyncio.wait(tasks, timeout=a.duration)
        for t in pending:  # hard stop: in-flight requests are cut, not failed
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        peaks.cancel()
        for s in samplers.values():
            s.stop()

    finished = [r for r in recs if r.total is not None or r.error is not None]
    ok = [r for r in finished if r.ok]
    elapsed = max((r.t_end for r in ok), default=time.perf_counter()) - t_start
    errors: dict[str, int] = {}
    for r in finished:
        if not r.ok:
            errors[r.error or "incomplete"] = errors.get(r.error or "incomplete", 0) + 1
    if a.expect_chunks and any(r.chunks != a.expect_chunks for r in ok):
        errors["chunk_count_mismatch"] = sum(r.chunks != a.expect_chunks for r in ok)
    ttft, total = [r.ttft for r in ok], [r.total for r in ok]
    out = {
        "target": a.target, "url": url, "concurrency": a.concurrency, "requests": len(recs), "ok": len(ok),
        "failed": len(finished) - len(ok), "cut": len(recs) - len(finished), "elapsed_s": round(elapsed, 3),
        "req_per_s": round(len(ok) / elapsed, 2) if elapsed > 0 else None,
        "ttft_ms": {"p50": ms(pct(ttft, 50)), "p90": ms(pct(ttft, 90)), "p99": ms(pct(ttft, 99))},
        "total_ms": {"p50": ms(pct(total, 50)), "p99": ms(pct(total, 99))},
        "chunks_per_req": [min((r.chunks for r in ok), default=0), max((r.chunks for r in ok), default=0)],
        "errors": errors,
        "client_cpu_s": round(cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime, 2),
        "procs": {label: s.report(len(ok)) for label, s in samplers.items()},
    }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", choices=sorted(PATHS), required=True)
    p.add_argument("--url", required=True, help="base URL, e.g. http://127.0.0.1:18000")
    p.add_argument("--api-key", default=os.environ.get("BENCH_API_KEY", ""))
    p.add_argument("--model", default="bench-model", help="model name in OpenAI-format bodies")
    p.add_argument("--prompt", default="Say something.")
    p.add_argument("-c", "--concurrency", type=int, default=1)
    p.add_argument("-n", "--requests", type=int, default=200)
    p.add_argument("--duration", type=float, default=60, help="hard cap on the measured run, s")
    p.add_argument("--warmup", type=int, default=20, help="unmeasured requests first")
    p.add_argument("--timeout", type=float, default=30, help="per request, s")
    p.add_argument("--expect-chunks", type=int, default=0, help="count ok replies with another number of chunks")
    p.add_argument("--pid", action="append", default=[], metavar="LABEL=PID", help="sample this process tree")
    a = p.parse_args()
    host = urlsplit(a.url).hostname or ""
    if not (host.startswith("127.") or host in ("localhost", "::1")):
        sys.exit(f"load: refusing non-loopback target {host!r}")
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    print(json.dumps(asyncio.run(run(a))), flush=True)


if __name__ == "__main__":
    main()
