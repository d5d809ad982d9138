"""What the gateway tells its operators: metrics, traces, logs.

    metrics.py   Prometheus metrics and each request's timing breakdown
    tracing.py   OpenTelemetry spans, switched on by the OTEL_* variables
    logs.py      text or JSON log lines, redacted and escaped
    combined.py  serve --workers N: a scrape of any worker sums every worker's metrics
    health.py    each model's last five minutes (requests, errors, first token, fallbacks)
"""

__all__ = [
    "combined",
    "health",
    "logs",
    "metrics",
    "tracing",
]
