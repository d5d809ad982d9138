"""What the gateway tells its operators: metrics, traces, logs.

    metrics.py   Prometheus metrics and each request's timing breakdown
    tracing.py   OpenTelemetry spans, switched on by the OTEL_* variables
    logs.py      text or JSON log lines, redacted and escaped
    health.py    each model's last five minutes (requests, errors, first token, fallbacks)
"""

__all__ = [
    "health",
    "logs",
    "metrics",
    "tracing",
]
