"""What tracing costs: the same load on a gateway with tracing off and on a gateway exporting every
span over OTLP/HTTP to a local sink (bench/otlp_sink.py), side by side, rounds interleaved.

Two gateways run at once (each with its own fake upstream and embedded PostgreSQL, as bench/run.py
starts them; both pinned to the gateway CPU, the sink with the tools): `off` has no OTEL_*
variable, `on` has OTEL_EXPORTER_OTLP_ENDPOINT pointing at the sink, so spans are really made,
batched and sent as protobuf over HTTP, as with any collector. Each round runs direct (the
upstream alone, for scale), then every target on both gateways, alternating which goes first.
Ratios are paired per round (on / off), so a busy machine's drift cancels as far as it can.

`--second off` starts the second gateway with tracing off too: an A/A run, whose ratios show the
noise floor that "off costs nothing" is judged against. The hooks' own cost with tracing off is
also timed in-process (`hooks_off_ns_per_turn`): the context-variable reads a turn makes.

    .venv/bin/python bench/tracing.py --targets native,openai -c 1 -n 400 --rounds 3
    .venv/bin/python bench/tracing.py --targets native -c 1 -n 400 --rounds 3 --second off
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import timeit
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from run import PY, Bench, Stop, gateway_arguments, log, pinned, spread, wait_up  # noqa: E402

ROWS = [("req/s", "req_per_s"), ("TTFT p50 ms", "ttft_ms.p50"), ("TTFT p99 ms", "ttft_ms.p99"),
        ("total p50 ms", "total_ms.p50"), ("gateway CPU ms/req", "procs.gateway.cpu_ms_per_req")]


def get(d: dict, path: str):
    for k in path.split("."):
        if not isinstance(d, dict) or d.get(k) is None:
            return None
        d = d[k]
    return d


def hooks_off_ns_per_turn() -> float:
    """The tracing hooks one streamed turn passes with tracing off (auth, policy, persist and finish-write
    spans, the chat span's start and end, an attempt's start and end, the upstream headers), in ns."""
    from gateway.config import ModelConfig
    from gateway.observability import tracing

    model = ModelConfig(name="m", provider="p", upstream="u")
    headers = {"Content-Type": "application/json"}

    def turn() -> None:
        for name in ("gateway.auth", "gateway.policy", "gateway.persist", "gateway.finish_write"):
            with tracing.span(name):
                pass
        tracing.start_chat(None, None)  # type: ignore[arg-type]  # never looked at when off
        tracing.attempt_started(model)
        tracing.upstream_headers(headers)
        tracing.attempt_ended(model, "ok")
        tracing.end_chat()

    n = 200_000
    return min(timeit.repeat(turn, number=n, repeat=5)) / n * 1e9


def sink_stats(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=5) as r:
        return json.loads(r.read())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--targets", default="native,openai", help="comma-separated: native, openai")
    p.add_argument("--second", choices=("otlp", "off"), default="otlp",
                   help="the second gateway's tracing: otlp (to the sink), or off (an A/A noise run)")
    p.add_argument("-c", "--concurrency", type=int, default=1)
    p.add_argument("-n", "--requests", type=int, default=400, help="measured requests per run")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--chunks", type=int, default=64)
    p.add_argument("--duration", type=float, default=60)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--sink-port", type=int, default=14318)
    gateway_arguments(p)
    p.add_argument("--pin", dest="pin", action="store_true", default=None)
    p.add_argument("--json-out")
    a = p.parse_args()
    a.targets = [t.strip() for t in a.targets.split(",") if t.strip()]
    if not a.targets or set(a.targets) - {"native", "openai"}:
        p.error("--targets takes native and/or openai")
    a.warmup = max(20, 2 * a.concurrency) if a.warmup is None else a.warmup
    for name in [k for k in os.environ if k.startswith("OTEL_")]:
        del os.environ[name]  # the gateways' tracing is what this script sets, nothing inherited
    shared = {"keep": False, "first_delay_ms": 0.0, "chunk_delay_ms": 0.0, "config_extra": None}
    off_args = argparse.Namespace(**{**vars(a), **shared})
    on_env = list(a.gateway_env)
    if a.second == "otlp":
        on_env += [f"OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:{a.sink_port}", "OTEL_SERVICE_NAME=bench-gateway"]
    on_args = argparse.Namespace(**{**vars(a), **shared, "upstream_port": a.upstream_port + 1,
                                    "gateway_port": a.gateway_port + 1, "gateway_env": on_env})
    label = "on" if a.second == "otlp" else "off2"

    def on_term(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)
    off, on = Bench(off_args), Bench(on_args)
    sink: subprocess.Popen | None = None
    try:
        sink = subprocess.Popen([PY, str(HERE / "otlp_sink.py"), "--port", str(a.sink_port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                                preexec_fn=pinned(off.tools_cpus))
        wait_up(sink, f"http://127.0.0.1:{a.sink_port}/stats", 15, "OTLP sink")
        off.start()
        on.start()
        runs: dict[str, list[dict]] = {"direct": []}
        for target in a.targets:
            runs[f"{target} off"], runs[f"{target} {label}"] = [], []
        for rnd in range(1, a.rounds + 1):
            runs["direct"].append(off.load("direct", a.requests, a.warmup))
            for target in a.targets:
                pair = [("off", off), (label, on)]
                for name, bench in (pair if rnd % 2 else pair[::-1]):  # alternate who goes first
                    r = bench.load(target, a.requests, a.warmup)
                    runs[f"{target} {name}"].append(r)
                    log(f"round {rnd} {target} {name}: ok={r['ok']} failed={r['failed']} req/s={r['req_per_s']} "
                        f"ttft_p50={r['ttft_ms']['p50']}ms gateway_cpu_ms/req={get(r, 'procs.gateway.cpu_ms_per_req')}")
        stats = sink_stats(a.sink_port)
        hooks_ns = hooks_off_ns_per_turn()
        report(a, runs, label, stats, hooks_ns)
        if a.json_out:
            Path(a.json_out).write_text(json.dumps({"args": vars(a), "runs": runs, "sink": stats,
                                                    "hooks_off_ns_per_turn": hooks_ns}, indent=1))
        return 0
    except Stop as e:
        log(f"error: {e}")
        return 1
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        on.stop()
        off.stop()
        if sink is not None:
            sink.terminate()
            sink.wait(10)


def report(a: argparse.Namespace, runs: dict[str, list[dict]], label: str, stats: dict, hooks_ns: float) -> None:
    names = list(runs)
    print(f"\nconcurrency={a.concurrency} requests<={a.requests} chunks={a.chunks} rounds={a.rounds} "
          f"second={a.second}  (median, min-max across rounds)\n")
    print("| metric | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for title, path in ROWS:
        print(f"| {title} | " + " | ".join(spread([get(r, path) for r in runs[n]]) for n in names) + " |")
    print(f"\n| target | req/s {label}/off | TTFT p50 {label}-off ms | total p50 {label}/off "
          f"| gateway CPU ms/req {label}/off |")
    print("|---|---|---|---|---|")
    for target in a.targets:
        pairs = list(zip(runs[f"{target} off"], runs[f"{target} {label}"], strict=True))

        def ratio(path: str, pairs: list[tuple[dict, dict]] = pairs) -> str:
            return spread([get(b, path) / get(o, path) for o, b in pairs if get(o, path) and get(b, path)])

        ttft = spread([get(b, "ttft_ms.p50") - get(o, "ttft_ms.p50") for o, b in pairs
                       if None not in (get(o, "ttft_ms.p50"), get(b, "ttft_ms.p50"))])
        print(f"| {target} | {ratio('req_per_s')} | {ttft} | {ratio('total_ms.p50')} "
              f"| {ratio('procs.gateway.cpu_ms_per_req')} |")
    requests = sum(r["ok"] + r["failed"] for n in names if n.endswith(f" {label}") for r in runs[n])
    print(f"\nOTLP sink: {stats['requests']} exports, {stats['bytes']} bytes, {stats['spans']} spans "
          f"(the measured requests of `{label}` were {requests}; warm-up and probe requests are traced too)")
    print(f"tracing hooks with tracing off: {hooks_ns:.0f} ns per turn (in-process timing)")


if __name__ == "__main__":
    sys.exit(main())
