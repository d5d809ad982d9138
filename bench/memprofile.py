#!/usr/bin/env python3
"""Where the memory of a held-open stream goes, inside the gateway process.

Runs the gateway in this process with tracemalloc on, a slow fake upstream (bench/upstream.py,
one chunk every 5 s) and a client process that opens --streams streams on
`/v1/chat/completions` and holds them. Once all are open, prints the Python allocations per
stream grouped by library (aiohttp, asyncio, the gateway's own code), the gc-tracked objects a
stream adds by type (how many coroutine frames, tasks, deques, dicts...) and the top lines of each.
Loopback only; stops everything it starts.

    .venv/bin/python bench/memprofile.py --streams 2000
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import shutil
import subprocess
import sys
import tempfile
import textwrap
import tracemalloc
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from aiohttp import web  # noqa: E402

from gateway.app import create_app  # noqa: E402
from gateway.config import Settings  # noqa: E402
from gateway.state import DB  # noqa: E402
from gateway.store.keys import create_user_with_key  # noqa: E402

CLIENT = textwrap.dedent("""
    import asyncio, sys, aiohttp
    url, key, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    async def main():
        body = {"model": "bench-model", "stream": True, "messages": [{"role": "user", "content": "hold"}]}
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            async def hold():
                resp = await http.post(url, json=body, headers={"Authorization": "Bearer " + key})
                await resp.content.readany()
                return resp
            held = []
            for i in range(0, n, 200):
                held += await asyncio.gather(*(hold() for _ in range(min(200, n - i))))
            print("open", flush=True)
            await asyncio.sleep(3600)
    asyncio.run(main())
""")


def object_types() -> dict[str, tuple[int, int]]:
    """The gc-tracked objects by type: (count, bytes by sys.getsizeof, their own size only)."""
    found: dict[str, tuple[int, int]] = {}
    for obj in gc.get_objects():
        kind = type(obj)
        name = f"{getattr(kind, '__module__', '?')}.{kind.__qualname__}"
        count, size = found.get(name, (0, 0))
        found[name] = (count + 1, size + sys.getsizeof(obj))
    return found


def group_of(filename: str) -> str:
    if "/gateway/" in filename and str(ROOT) in filename:
        return "gateway (this project)"
    for name in ("aiohttp", "asyncio", "asyncpg"):
        if f"/{name}/" in filename:
            return name
    return "other"


async def profile(a: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="gw-mem-"))
    upstream = subprocess.Popen([sys.executable, str(HERE / "upstream.py"), "--port", str(a.upstream_port),
                                 "--chunks", "1000", "--chunk-delay-ms", "5000"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = None
    config = tmp / "gateway.toml"
    config.write_text(f'[providers.b]\nkind = "openai"\nbase_url = "http://127.0.0.1:{a.upstream_port}/v1"\n'
                      '[models.bench-model]\nprovider = "b"\nidle_timeout_s = 600\ntimeout_s = 900\n')
    env = {"GATEWAY_CONFIG": str(config), "DEFAULT_MODEL": "bench-model", "GATEWAY_DATA_DIR": str(tmp / "data"),
           "BOOTSTRAP_ADMIN_KEY": "false", "LOG_LEVEL": "WARNING"}
    if a.database_url:
        env["DATABASE_URL"] = a.database_url
    runner = web.AppRunner(create_app(Settings.from_env(env)), access_log=None, handler_cancellation=True)
    try:
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", a.gateway_port, backlog=4096).start()
        _, key = await create_user_with_key(runner.app[DB].pool, "memprofile", ["chat"])
        await asyncio.sleep(1)
        gc.collect()
        tracemalloc.start(1)
        before = tracemalloc.take_snapshot()
        types_before = object_types()
        client = await asyncio.create_subprocess_exec(
            sys.executable, "-c", CLIENT, f"http://127.0.0.1:{a.gateway_port}/v1/chat/completions", key,
            str(a.streams), stdout=asyncio.subprocess.PIPE)
        assert client.stdout is not None
        await asyncio.wait_for(client.stdout.readline(), timeout=120)  # "open": every stream is held
        await asyncio.sleep(2)
        gc.collect()
        after = tracemalloc.take_snapshot()
        types_after = object_types()
    finally:
        if client is not None and client.returncode is None:
            client.kill()
            await client.wait()
        await runner.cleanup()  # also stops the embedded PostgreSQL
        upstream.kill()
        upstream.wait()
        shutil.rmtree(tmp, ignore_errors=True)

    n = a.streams
    files = after.compare_to(before, "filename")
    lines = after.compare_to(before, "lineno")
    groups: dict[str, int] = {}
    for st in files:
        groups[group_of(st.traceback[0].filename)] = groups.get(group_of(st.traceback[0].filename), 0) + st.size_diff
    print(f"{n} held streams: {sum(groups.values()) / n / 1024:.1f} KB per stream of Python allocations")
    for name, size in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"  {size / n / 1024:6.1f} KB  {name}")
    print("gc-tracked objects per stream, by type (count, own bytes): frames are in `coroutine` and "
          "`async_generator`")
    grown = [(name, (count - types_before.get(name, (0, 0))[0]) / n, (size - types_before.get(name, (0, 0))[1]) / n)
             for name, (count, size) in types_after.items()]
    for name, count, size in sorted(grown, key=lambda row: -row[2])[:a.top]:
        print(f"  {count:6.2f} {size:7.0f} B  {name}")
    for name in ("gateway (this project)", "aiohttp", "asyncio", "other"):
        print(f"top lines, {name}:")
        for st in [s for s in lines if group_of(s.traceback[0].filename) == name][:a.top]:
            frame = st.traceback[0]
            where = frame.filename.split("site-packages/")[-1].replace(str(ROOT) + "/", "")
            print(f"  {st.size_diff / n:7.0f} B  {where}:{frame.lineno}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=int, default=2000)
    p.add_argument("--upstream-port", type=int, default=18400)
    p.add_argument("--gateway-port", type=int, default=18401)
    p.add_argument("--database-url")
    p.add_argument("--top", type=int, default=8, help="lines shown per group")
    a = p.parse_args()
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    asyncio.run(profile(a))
    return 0


if __name__ == "__main__":
    sys.exit(main())
