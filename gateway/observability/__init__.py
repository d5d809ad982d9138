"""What the gateway tells its operators: metrics, traces, logs.

    metrics.py   Prometheus metrics and each request's timing breakdown
    tracing.py   OpenTelemetry spans, switched on by the OTEL_* variables
    logs.py      text or JSON log lines, redacted and escaped
"""

__all__ = [
    "logs",
    "metrics",
    "tracing",
]
