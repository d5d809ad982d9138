"""A local OTLP/HTTP trace sink for the tracing benchmark: takes what an OpenTelemetry exporter
sends to `POST /v1/traces` (protobuf), answers 200 as a collector does, and counts it.

    python bench/otlp_sink.py --port 4318        GET /stats -> {"requests", "bytes", "spans"}

Spans are counted by decoding each export (with opentelemetry-proto, which the OTLP exporter
installs); without it only requests and bytes are counted (`spans` is null).
"""

from __future__ import annotations

import argparse

from aiohttp import web

try:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
except ImportError:  # pragma: no cover - the exporter's own dependency
    ExportTraceServiceRequest = None


def make_app() -> web.Application:
    stats: dict[str, int | None] = {"requests": 0, "bytes": 0,
                                    "spans": 0 if ExportTraceServiceRequest is not None else None}

    async def traces(request: web.Request) -> web.Response:
        body = await request.read()
        stats["requests"] += 1
        stats["bytes"] += len(body)
        if ExportTraceServiceRequest is not None:
            export = ExportTraceServiceRequest.FromString(body)
            stats["spans"] += sum(len(scope.spans) for r in export.resource_spans for scope in r.scope_spans)
        return web.Response(body=b"", content_type="application/x-protobuf")

    async def get_stats(request: web.Request) -> web.Response:
        return web.json_response(stats)

    app = web.Application(client_max_size=64 << 20)
    app.router.add_post("/v1/traces", traces)
    app.router.add_get("/stats", get_stats)
    return app


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, default=4318)
    a = p.parse_args()
    web.run_app(make_app(), host="127.0.0.1", port=a.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
