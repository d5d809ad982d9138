"""Webhooks: signed event deliveries from a durable outbox in PostgreSQL, off the request path.

    outbox.py   the outbox table's SQL: enqueue events, claim due ones, record each attempt's outcome
    signing.py  Standard Webhooks signatures (webhook-id, webhook-timestamp, webhook-signature)
    worker.py   the background worker: finds budgets crossing their thresholds, delivers with retries
"""

__all__ = [
    "outbox",
    "signing",
    "worker",
]
